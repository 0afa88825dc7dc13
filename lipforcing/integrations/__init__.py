"""Adapters to voice-agent hosts, each an optional extra imported on use: :mod:`lipforcing.integrations.livekit`
(LiveKit Agents ``VideoGenerator`` and worker load reporting) and :mod:`lipforcing.integrations.pipecat` (a
Pipecat ``FrameProcessor``)."""
