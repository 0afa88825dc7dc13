"""The LiveKit Agents adapter driven by LiveKit's own AvatarRunner and QueueAudioOutput, offline: a stub room (no
server) stands in for rtc.Room; the runner's AVSynchronizer paces the output in real time."""
import asyncio

import numpy as np
import pytest

pytest.importorskip("livekit.agents")
from livekit import rtc  # noqa: E402
from livekit.agents.voice.avatar import AudioSegmentEnd, AvatarRunner, QueueAudioOutput  # noqa: E402

import lipforcing  # noqa: E402
from lipforcing.integrations.livekit import LipForcingVideoGenerator, engine_load, engine_load_fnc  # noqa: E402
from tests.stream.helpers import RES, SMALL_VAE, reference_frames, small_config, speech  # noqa: E402

P = 640
RATE = 24000          # a typical TTS rate: the session resamples to 16 kHz
TIMEOUT = 60


class _Publication:
    async def wait_for_subscription(self):
        return None


class _Participant:
    def __init__(self):
        self.tracks = []

    async def publish_track(self, track, options):
        self.tracks.append(track)
        return _Publication()


class _StubRoom:
    """What AvatarRunner uses of rtc.Room: on/off, isconnected, local_participant.publish_track."""

    def __init__(self):
        self.local_participant = _Participant()

    def on(self, *_):
        return None

    def off(self, *_):
        return None

    def isconnected(self):
        return True


@pytest.fixture(scope="module")
def lk_engine():
    e = lipforcing.Engine.load(model=small_config(), vae=SMALL_VAE, resolution=RES, seed=6, backend="reference")
    yield e
    e.close()


def _frames_24k(pcm16, rng):
    i = 0
    while i < len(pcm16):
        n = int(rng.integers(100, 700))
        yield rtc.AudioFrame(pcm16[i:i + n].tobytes(), RATE, 1, len(pcm16[i:i + n]))
        i += n


def _alone(engine, ref, pcm16, seed):
    with engine.session(ref, seed=seed, sample_rate=RATE) as s:
        s.push_audio(pcm16)
        s.end_of_speech()
        return list(s.frames(timeout=TIMEOUT))


def test_avatar_runner_drives_the_generator(lk_engine, _fresh_random_inputs):
    rng = np.random.default_rng(_fresh_random_inputs)
    ref = reference_frames(3, seed=int(rng.integers(1 << 30)))
    pcm16 = (speech(int(RATE * 0.9) + int(rng.integers(1, 500)), seed=int(rng.integers(1 << 30))) * 30000
             ).astype(np.int16)
    want = _alone(lk_engine, ref, pcm16, seed=3)

    async def run():
        gen = LipForcingVideoGenerator(lk_engine, ref, seed=3)
        seen = []
        real_frames = gen._frames

        async def spy():                      # what the generator hands to the runner, in order
            async for item in real_frames():
                seen.append(item)
                yield item

        gen._frames = spy
        audio = QueueAudioOutput(sample_rate=RATE)
        finished = asyncio.get_running_loop().create_future()
        audio.on("playback_finished", lambda ev: finished.done() or finished.set_result(ev))
        room = _StubRoom()
        runner = AvatarRunner(room, audio_recv=audio, video_gen=gen, options=gen.avatar_options())
        await runner.start()
        for frame in _frames_24k(pcm16, rng):
            await audio.capture_frame(frame)
        audio.flush()                         # AudioSegmentEnd
        ev = await asyncio.wait_for(finished, TIMEOUT)
        await runner.aclose()
        await gen.aclose()
        return seen, ev, room

    seen, ev, room = asyncio.run(run())
    video = [x for x in seen if isinstance(x, rtc.VideoFrame)]
    audio = [x for x in seen if isinstance(x, rtc.AudioFrame)]
    assert len(video) == len(audio) == len(want)                       # one frame per 640 samples at 16 kHz
    assert isinstance(seen[-1], AudioSegmentEnd) and type(seen[-2]) is rtc.AudioFrame
    for v, a, f in zip(video, audio, want):
        assert (v.width, v.height) == (RES, RES)
        np.testing.assert_array_equal(np.frombuffer(v.data, np.uint8).reshape(RES, RES, 3), f.image)
        assert a.sample_rate == 16000 and a.samples_per_channel == P
        np.testing.assert_array_equal(np.frombuffer(a.data, np.int16),
                                      np.clip(np.round(f.audio * 32768), -32768, 32767).astype(np.int16))
    assert not ev.interrupted and ev.playback_position == pytest.approx(len(want) * 0.04, abs=0.05)
    assert len(room.local_participant.tracks) == 2                    # audio and video published


def test_clear_buffer_interrupts(lk_engine):
    async def run():
        gen = LipForcingVideoGenerator(lk_engine, reference_frames(2), sample_rate=16000, seed=1)
        await gen.push_audio(rtc.AudioFrame((speech(P * 100, seed=2) * 20000).astype(np.int16).tobytes(),
                                            16000, 1, P * 100))
        it = gen.__aiter__()
        first = await asyncio.wait_for(it.__anext__(), TIMEOUT)
        gen.clear_buffer()
        assert gen.session.pending_chunks == 0 and gen.session.frames_ready == 0
        await gen.push_audio(rtc.AudioFrame((speech(P * 9 + 200, seed=3) * 20000).astype(np.int16).tobytes(),
                                            16000, 1, P * 9 + 200))
        await gen.push_audio(AudioSegmentEnd())
        items = []
        while not items or not isinstance(items[-1], AudioSegmentEnd):
            items.append(await asyncio.wait_for(it.__anext__(), TIMEOUT))
        await gen.aclose()
        return first, items

    first, items = asyncio.run(run())
    assert isinstance(first, rtc.VideoFrame)
    video = [x for x in items if isinstance(x, rtc.VideoFrame)]
    assert len(video) <= 10 + 1 and len(video) >= 10                 # the new utterance (plus a frame in flight)


def test_worker_load_reporting(lk_engine):
    lk_engine.scheduler.configure(max_sessions=4)
    try:
        load = engine_load_fnc(lk_engine)
        assert load() == 0.0 and load(object()) == 0.0
        sessions = [lk_engine.session(reference_frames(1)) for _ in range(3)]
        assert engine_load(lk_engine) == pytest.approx(0.75)
        sessions.append(lk_engine.session(reference_frames(1)))
        assert load() == 1.0
        for s in sessions:
            s.close()
        assert load() == 0.0
    finally:
        lk_engine.scheduler.configure(max_sessions=None)
    # LiveKit's own options accept it
    from livekit.agents import WorkerOptions

    opts = WorkerOptions(entrypoint_fnc=lambda ctx: None, load_fnc=engine_load_fnc(lk_engine), load_threshold=0.9)
    assert opts.load_fnc() == 0.0
