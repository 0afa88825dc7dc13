"""The Pipecat adapter driven by Pipecat's own test runner (pipecat.tests.utils.run_test): TTS audio in, image +
paired audio frames out, TTSStoppedFrame after the utterance's last frame, interruption drops queued work."""
import asyncio

import numpy as np
import pytest

pytest.importorskip("pipecat")
from pipecat.frames.frames import (InterruptionFrame, OutputAudioRawFrame, OutputImageRawFrame,  # noqa: E402
                                   TTSAudioRawFrame, TTSStartedFrame, TTSStoppedFrame)
from pipecat.tests.utils import SleepFrame, run_test  # noqa: E402

import lipforcing  # noqa: E402
from lipforcing.integrations.pipecat import LipForcingVideoService  # noqa: E402
from tests.stream.helpers import RES, SMALL_VAE, reference_frames, small_config, speech  # noqa: E402

P = 640
RATE = 24000


@pytest.fixture(scope="module")
def pc_engine():
    e = lipforcing.Engine.load(model=small_config(), vae=SMALL_VAE, resolution=RES, seed=7, backend="reference")
    yield e
    e.close()


def _tts(pcm16, rng):
    out, i = [], 0
    while i < len(pcm16):
        n = int(rng.integers(200, 1200))
        out.append(TTSAudioRawFrame(audio=pcm16[i:i + n].tobytes(), sample_rate=RATE, num_channels=1))
        i += n
    return out


def test_tts_audio_to_synced_frames(pc_engine, _fresh_random_inputs):
    rng = np.random.default_rng(_fresh_random_inputs)
    ref = reference_frames(2, seed=int(rng.integers(1 << 30)))
    pcm16 = (speech(int(RATE * 1.1) + int(rng.integers(1, 900)), seed=int(rng.integers(1 << 30))) * 30000
             ).astype(np.int16)
    with pc_engine.session(ref, seed=5, sample_rate=RATE) as s:
        s.push_audio(pcm16)
        s.end_of_speech()
        want = list(s.frames(timeout=60))
    service = LipForcingVideoService(pc_engine, ref, seed=5)
    down, _ = asyncio.run(run_test(service, frames_to_send=[TTSStartedFrame(), *_tts(pcm16, rng), TTSStoppedFrame()],
                                   expected_down_frames=[TTSStartedFrame] + [OutputImageRawFrame,
                                                                            OutputAudioRawFrame] * len(want)
                                   + [TTSStoppedFrame]))
    images, audios = down[1:-1:2], down[2:-1:2]
    for img, aud, f in zip(images, audios, want):
        assert img.size == (RES, RES) and img.format == "RGB" and img.sync_with_audio
        np.testing.assert_array_equal(np.frombuffer(img.image, np.uint8).reshape(RES, RES, 3), f.image)
        assert aud.sample_rate == 16000 and aud.num_channels == 1 and aud.num_frames == P
        np.testing.assert_array_equal(np.frombuffer(aud.audio, np.int16),
                                      np.clip(np.round(f.audio * 32768), -32768, 32767).astype(np.int16))
    assert service.session is None and pc_engine.stats()["sessions"] == 0


def test_interruption_drops_queued_work(pc_engine, _fresh_random_inputs):
    rng = np.random.default_rng(_fresh_random_inputs)
    long16 = (speech(RATE * 6, seed=1) * 30000).astype(np.int16)            # 150 frames queued at once
    short16 = (speech(int(RATE * 0.5), seed=2) * 30000).astype(np.int16)    # 13 frames after the barge-in
    service = LipForcingVideoService(pc_engine, reference_frames(1), seed=2)
    frames = [TTSStartedFrame(), *_tts(long16, rng), SleepFrame(sleep=0.5), InterruptionFrame(),
              TTSStartedFrame(), *_tts(short16, rng), TTSStoppedFrame()]
    down, _ = asyncio.run(run_test(service, frames_to_send=frames))
    kinds = [type(f) for f in down]
    cut = kinds.index(InterruptionFrame)
    after = [f for f in down[cut:] if isinstance(f, OutputImageRawFrame)]
    before = [f for f in down[:cut] if isinstance(f, OutputImageRawFrame)]
    assert 0 < len(before) < 150                               # interrupted mid-utterance
    assert 13 <= len(after) <= 13 + 12                         # the new utterance, plus at most a chunk in flight
    assert kinds[-1] is TTSStoppedFrame
