"""The streaming engine: the push-audio / pull-frames API that lip-sync hosts (LiveKit, Pipecat, WebRTC) drive.

::

    engine = lipforcing.Engine.load("student.safetensors", model="1.3b", device="cuda", vae="Wan2.1_VAE.pth",
                                    audio_encoder="wav2vec2-base-960h/", text="prompt_embedding.pt")
    sess = engine.session(video_frames)         # (N, H, W, 3) uint8 of any size (face stage), or a video path
    sess.push_audio(pcm)                        # int16 / float32 mono, any length, any number of times
    for frame in sess.frames():                 # non-blocking: the frames that are ready now
        show(frame.image, frame.pts); play(frame.audio)
    sess.end_of_speech()                        # flush the last partial chunk
    for frame in sess.frames(): ...             # after end_of_speech: all the remaining frames
    sess.close()

Timeline.  Audio is converted to 16 kHz mono; video is 25 fps, so frame ``i`` covers samples
``[640 i, 640 (i + 1))`` of the speech pushed since the session started (``pts = i / 25`` seconds on that audio
clock).  Exactly one frame comes out per 640 samples pushed (a partial last frame of an utterance counts: its
``audio`` is zero-padded to 640 samples), and the frames depend only on the audio samples, the reference, the
seed and the ``end_of_speech()`` / ``interrupt()`` calls, never on how the audio was split into pushes.

Chunks.  The student generates 3 latent frames per step: 9 video frames for the first chunk of an utterance, 12
afterwards (``Engine.first_chunk_frames``, ``Engine.chunk_frames``).  A chunk is computed once its audio and the
audio front end's lookahead have arrived (``Engine.latency_report()``).  Per chunk (paper, section 5):

  1. ``audio_features``  the front end's streaming features of the chunk's frames -> (1, 3, 4, audio_dim)
  1b. ``face_align``     full-frame references only: cut the chunk's aligned crops (the face was tracked once, when
                         the session opened; :mod:`lipforcing.engine.reference`)
  2. ``vae_encode``      the chunk's reference frames (ping-ponged when the reference is shorter than the speech),
                         unmasked and mouth-masked, through one streaming VAE encoder (batch of 2)
  3. ``dit_pass_1``      velocity at t = 0.999 of pure noise eps(seed, 2k) (counter-based, no host sync)
  4. ``denoise_update``  x0 = x - 0.999 v; re-noise to t = 0.769 with eps(seed, 2k + 1)
  5. ``dit_pass_2``      velocity at t = 0.769, then ``denoise_update`` again (t_next = 0) for x0
  6. ``vae_decode``      streaming decode of x0 to frames (uint8, moved to the host)
  6b. ``paste_back``     full-frame references only: the generated crops composited into their reference frames
  7. ``cache_write``     a third pass on the clean x0 at t = 0 writes the chunk's K/V into the rolling cache

Threads.  Nothing is computed in the caller's thread: ``push_audio`` validates, resamples and buffers;
the engine's scheduler (:mod:`lipforcing.engine.scheduler`, one daemon worker thread per engine) runs the chunks
that are ready, earliest deadline first, batching the chunks of several sessions into one DiT pass; ``frames()``
hands out what is ready (``frames(block=True, timeout=...)`` waits; ``async for f in session.aframes()`` and
``await session.apush_audio(...)`` are the asyncio forms).  One :class:`Engine` serves many sessions: the
weights, VAE, audio front end and text K/V are held once; each session holds its KV caches, streaming
VAE/feature state, at most ``max_buffer_seconds`` of audio and about 4 s of frames not yet taken (memory is
constant over arbitrarily long streams).  ``engine.close()`` closes the sessions and stops the worker.

Utterances.  ``end_of_speech()`` ends an utterance: its last chunk is computed on audio padded with silence and
only the frames covered by real audio are emitted.  ``interrupt()`` drops the buffered audio and the frames not
yet taken.  Either way the next ``push_audio`` starts a new utterance: the model's KV cache and the streaming
VAE/feature states are reset (in place), frame indices continue from the frames delivered so far, and the
reference video continues from the same position.

Profiling hook.  Every stage above runs inside ``with engine.stage(name):``.  By default ``stage`` returns a
no-op context; a profiler replaces it with any callable returning a context manager, e.g.
``engine.stage = lambda name: my_timer(name)`` (``denoise_update`` is entered twice per chunk).  With
``cuda_graphs=True`` the DiT passes and the updates are replayed CUDA graphs (one per stage, same names).
"""

from lipforcing.engine.chunk_step import STAGES
from lipforcing.engine.engine import Engine
from lipforcing.engine.frame import Frame
from lipforcing.engine.scheduler import AdmissionError, Scheduler
from lipforcing.engine.session import Session

__all__ = ["Engine", "Session", "Frame", "STAGES", "Scheduler", "AdmissionError"]
