"""Session semantics on the tiny preset (CPU, random weights): push-split invariance, end_of_speech, interrupt,
input validation, ping-pong reference, the profiling hook."""
import contextlib

import numpy as np
import pytest
import torch

import lipforcing
from lipforcing import face
from lipforcing.engine import STAGES, Frame
from tests.stream.helpers import RES, assert_same_frames, drain, reference_frames, speech

P = 640  # samples per frame


def run_pieces(engine, ref, pcm, sizes, *, seed=0, sample_rate=16000, drain_every=1):
    """Push pcm in pieces of the given sizes (cycled), draining frames() every `drain_every` pushes."""
    s = engine.session(ref, seed=seed, sample_rate=sample_rate)
    out, i, k = [], 0, 0
    while i < len(pcm):
        n = sizes[k % len(sizes)]
        s.push_audio(pcm[i:i + n])
        i += n
        k += 1
        if k % drain_every == 0:
            out += drain(s)
    s.end_of_speech()
    out += drain(s)
    return out


def test_split_invariance_10ms_vs_one_piece(engine):
    ref = reference_frames(7)
    pcm = speech(P * 33 + 250, seed=1)              # 3 chunks + a partial frame
    whole = run_pieces(engine, ref, pcm, [len(pcm)])
    pieces = run_pieces(engine, ref, pcm, [160])     # 10 ms pushes, drained after each
    assert len(whole) == 34                          # one frame per 640 samples, the partial one included
    assert_same_frames(whole, pieces)
    # odd sizes, int16 input, drained rarely: still the same frames (int16 quantisation aside, same audio)
    pcm16 = (pcm * 32767).astype(np.int16)
    a = run_pieces(engine, ref, pcm16, [len(pcm16)])
    b = run_pieces(engine, ref, pcm16, [1, 333, 7, 2000, 640], drain_every=3)
    assert_same_frames(a, b)
    # the frames really depend on the audio and the seed (the test could fail)
    other_seed = run_pieces(engine, ref, pcm, [len(pcm)], seed=5)
    assert any(not np.array_equal(x.image, y.image) for x, y in zip(whole, other_seed))


def test_split_invariance_resampled_48k(engine):
    ref = reference_frames(3)
    pcm = speech(3 * (P * 10 + 77), seed=2)          # 48 kHz input
    whole = run_pieces(engine, ref, pcm, [len(pcm)], sample_rate=48000)
    pieces = run_pieces(engine, ref, pcm, [480], sample_rate=48000)    # 10 ms at 48 kHz
    assert len(whole) == 11              # 19431 samples at 48 kHz -> 6477 at 16 kHz -> 10 frames + a partial one
    assert_same_frames(whole, pieces)


def test_frames_timeline_and_audio_pairing(engine):
    ref = reference_frames(4)
    pcm = speech(P * 21 + 160, seed=3)               # exactly chunk 0 and chunk 1 plus the mel lookahead
    s = engine.session(ref)
    s.push_audio(pcm)
    got = drain(s)
    assert [f.index for f in got] == list(range(21))
    assert [f.chunk_id for f in got] == [0] * 9 + [1] * 12
    for f in got:
        assert isinstance(f, Frame)
        assert f.pts == f.index / 25
        assert f.image.shape == (RES, RES, 3) and f.image.dtype == np.uint8
        assert f.audio.shape == (P,) and f.audio.dtype == np.float32
        np.testing.assert_array_equal(f.audio, pcm[f.index * P:(f.index + 1) * P])
    assert drain(s) == []                            # non-blocking: nothing more without audio
    s.close()


def test_end_of_speech_flushes_partial_chunk(engine):
    ref = reference_frames(5)
    pcm = speech(P * 20 + 100, seed=4)
    s = engine.session(ref)
    s.push_audio(pcm)
    first = drain(s)
    assert [f.index for f in first] == list(range(9))     # chunk 1 needs 21 frames + lookahead
    s.end_of_speech()
    rest = drain(s)
    assert [f.index for f in rest] == list(range(9, 21))  # 20 whole frames + the partial one, no padding frames
    last = rest[-1]
    np.testing.assert_array_equal(last.audio[:100], pcm[20 * P:])
    assert not last.audio[100:].any()
    assert drain(s) == []
    s.end_of_speech()                                      # nothing pending: no-op
    assert drain(s) == []
    # the next utterance continues the timeline
    s.push_audio(speech(150, seed=5))
    s.end_of_speech()
    nxt = drain(s)
    assert [f.index for f in nxt] == [21] and nxt[0].pts == 21 / 25
    assert nxt[0].chunk_id == rest[-1].chunk_id + 1
    s.close()


def test_end_of_speech_matches_whole_push(engine):
    """A flushed utterance gives the same frames whether its chunks were computed before or after the flush."""
    ref = reference_frames(5)
    pcm = speech(P * 30 + 5, seed=6)
    a = run_pieces(engine, ref, pcm, [len(pcm)])
    b = run_pieces(engine, ref, pcm, [P * 10, P * 10, P * 10 + 5])
    assert len(a) == 31
    assert_same_frames(a, b)


def test_interrupt_drops_queued_audio_and_frames(engine):
    ref = reference_frames(5)
    s = engine.session(ref, seed=3)
    s.push_audio(speech(P * 40, seed=7))
    it = s.frames(block=True)
    taken = [next(it) for _ in range(3)]
    s.interrupt()
    assert list(it) == []                          # the rest of chunk 0 is gone
    assert drain(s) == []
    assert s.buffered_samples == 0
    # usable afterwards: a new utterance starting at the next index, with a fresh first chunk of 9 frames
    pcm = speech(P * 9 + 160, seed=8)
    s.push_audio(pcm)
    after = drain(s)
    assert [f.index for f in after] == list(range(3, 12))
    assert after[0].chunk_id == taken[-1].chunk_id + 1
    for f in after:
        np.testing.assert_array_equal(f.audio, pcm[(f.index - 3) * P:(f.index - 2) * P])
    # interrupting with nothing queued, and twice, is harmless
    s.interrupt()
    s.interrupt()
    s.push_audio(pcm)
    s.end_of_speech()
    assert [f.index for f in drain(s)] == list(range(12, 22))
    s.close()


def test_interrupt_then_same_audio_is_deterministic(engine):
    ref = reference_frames(5)

    def run():
        s = engine.session(ref, seed=11)
        s.push_audio(speech(P * 25, seed=9))
        it = s.frames(block=True)
        [next(it) for _ in range(4)]
        s.interrupt()
        s.push_audio(speech(P * 12, seed=10))
        s.end_of_speech()
        return drain(s)

    assert_same_frames(run(), run())


def test_bad_input_clear_errors_and_session_stays_usable(engine):
    ref = reference_frames(4)
    pcm = speech(P * 12, seed=12)
    clean = run_pieces(engine, ref, pcm, [P * 4])

    s = engine.session(ref)
    out = []
    for i in range(3):
        s.push_audio(pcm[i * P * 4:(i + 1) * P * 4])
        with pytest.raises(ValueError, match="1-D mono"):
            s.push_audio(np.zeros((320, 2), np.float32))               # stereo
        bad = pcm[:100].copy()
        bad[17] = np.nan
        with pytest.raises(ValueError, match="non-finite"):
            s.push_audio(bad)                                            # NaN
        with pytest.raises(TypeError, match="int16, float32 or float64"):
            s.push_audio(np.zeros(100, np.int32))
        with pytest.raises(TypeError, match="numpy.ndarray or torch.Tensor"):
            s.push_audio([0.0] * 100)
        with pytest.raises(TypeError, match="sample_rate must be an int"):
            s.push_audio(pcm[:10], sample_rate=16000.0)
        with pytest.raises(ValueError, match="differs from the session"):
            s.push_audio(pcm[:10], sample_rate=44100)
        out += drain(s)
    s.end_of_speech()
    out += drain(s)
    assert_same_frames(clean, out)

    with pytest.raises(TypeError, match="sample_rate must be an int"):
        engine.session(ref, sample_rate=16000.0)
    with pytest.raises(ValueError, match="sample_rate must be > 0"):
        engine.session(ref, sample_rate=0)
    for rate in (1, 7999, 192001, 10**9):
        with pytest.raises(ValueError, match="between 8000 and 192000 Hz"):
            engine.session(ref, sample_rate=rate)
    with pytest.raises(ValueError, match=f"{RES}x{RES}"):
        engine.session(reference_frames(2, res=32))
    with pytest.raises(TypeError, match="uint8"):
        engine.session(ref.astype(np.float32) / 255)
    with pytest.raises(TypeError, match="uint8"):
        engine.session(torch.from_numpy(ref).float())
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        engine.session(ref[..., :1])
    with pytest.raises(ValueError, match="no frames"):
        engine.session(ref[:0])
    with pytest.raises(TypeError, match="seed must be an int"):
        engine.session(ref, seed=0.5)


def test_buffer_bound_and_close(engine):
    s = engine.session(reference_frames(2), max_buffer_seconds=1.0)
    s.push_audio(speech(16000, seed=13))
    with pytest.raises(BufferError, match="drain frames"):
        s.push_audio(speech(16000, seed=14))
    assert len(drain(s)) == 21                    # chunks 0 and 1 were ready; the session still works
    s.push_audio(speech(8000, seed=14))
    s.close()
    assert s.closed
    with pytest.raises(RuntimeError, match="closed"):
        s.push_audio(speech(100))
    with pytest.raises(RuntimeError, match="closed"):
        s.frames()


def test_pingpong_reference(engine, monkeypatch):
    """The reference frames fed to the VAE follow 0 1 2 3 2 1 0 1 ... over the whole session."""
    from lipforcing.vae.streaming import StreamEncoder

    n_ref = 4
    ref = np.zeros((n_ref, RES, RES, 3), np.uint8)
    for i in range(n_ref):
        ref[i] = 40 * i + 10                           # frame i is a flat image of value 40 i + 10
    seen = []
    orig = StreamEncoder.encode

    def spy(self, frames):
        unmasked = ((frames[0].float() + 1) * 127.5).round().to(torch.uint8)   # (3, n, H, W)
        seen.extend(int(v) for v in unmasked[0, :, 0, 0])
        return orig(self, frames)

    monkeypatch.setattr(StreamEncoder, "encode", spy)
    s = engine.session(ref)
    s.push_audio(speech(P * 15, seed=15))
    s.end_of_speech()                                  # 15 frames: chunks of 9 + 12 (6 padding frames)
    s.push_audio(speech(P * 3, seed=16))               # next utterance: continues at frame 15
    s.end_of_speech()
    frames = drain(s)
    assert [f.index for f in frames] == list(range(18))
    expected = [40 * face.pingpong_index(i, n_ref) + 10 for i in range(21)]
    expected += [40 * face.pingpong_index(i, n_ref) + 10 for i in range(15, 15 + 9)]
    assert seen == expected
    assert expected[:8] == [10, 50, 90, 130, 90, 50, 10, 50]


def test_stage_hook(engine):
    names = []

    @contextlib.contextmanager
    def record(name):
        names.append(name)
        yield

    s = engine.session(reference_frames(2))
    assert isinstance(engine.stage("x"), contextlib.AbstractContextManager)
    engine.stage = record              # before the audio: the scheduler computes the chunk as soon as it is ready
    try:
        s.push_audio(speech(P * 9 + 160, seed=17))
        assert len(drain(s)) == 9
    finally:
        del engine.stage                               # back to the built-in no-op
    assert names == ["audio_features", "face_align", "vae_encode", "dit_pass_1", "denoise_update", "dit_pass_2",
                     "denoise_update", "vae_decode", "paste_back", "cache_write"]   # face stages: no-ops for crops
    assert set(names) == set(STAGES)
    drain(s)
    assert len(names) == 10


def test_engine_facts_and_options():
    e = lipforcing.Engine.load(model="tiny", backend="reference")
    assert e.resolution == (32, 32)                    # the tiny preset's default crop size
    assert (e.first_chunk_frames, e.chunk_frames, e.latent_chunk_frames) == (9, 12, 3)
    rep = e.latency_report()
    assert rep["first_chunk_audio_samples"] == 9 * P + e.lookahead_samples
    assert rep["steady_state_audio_ms"] == pytest.approx((12 * P + e.lookahead_samples) / 16)
    with pytest.raises(ValueError, match="multiples of 16"):
        lipforcing.Engine.load(model="tiny", resolution=24)
    with pytest.raises(ValueError, match="CUDA"):
        lipforcing.Engine.load(model="tiny", cuda_graphs=True)
    with pytest.raises(ValueError, match="dtype"):
        lipforcing.Engine.load(model="tiny", dtype="int8")
    with pytest.raises(ValueError, match="unknown model preset"):
        lipforcing.Engine.load(model="huge")


def test_same_seed_same_engine_weights():
    """Random weights are a fixed function of the engine seed (and two engines agree frame for frame)."""
    a = lipforcing.Engine.load(model="tiny", resolution=RES, seed=3, backend="reference")
    b = lipforcing.Engine.load(model="tiny", resolution=RES, seed=3, backend="reference")
    ref = reference_frames(3)
    pcm = speech(P * 5, seed=18)
    assert_same_frames(run_pieces(a, ref, pcm, [len(pcm)]), run_pieces(b, ref, pcm, [len(pcm)]))


def test_sessions_share_an_engine_independently(engine):
    """Two interleaved sessions on one engine give the frames each gives alone."""
    ref_a, ref_b = reference_frames(3, seed=1), reference_frames(6, seed=2)
    pcm_a, pcm_b = speech(P * 22, seed=19), speech(P * 14 + 9, seed=20)
    alone_a = run_pieces(engine, ref_a, pcm_a, [len(pcm_a)], seed=1)
    alone_b = run_pieces(engine, ref_b, pcm_b, [len(pcm_b)], seed=2)
    sa, sb = engine.session(ref_a, seed=1), engine.session(ref_b, seed=2)
    got_a, got_b = [], []
    for i in range(0, P * 22, P * 3):
        sa.push_audio(pcm_a[i:i + P * 3])
        sb.push_audio(pcm_b[i:i + P * 3])
        got_b += drain(sb)
        got_a += drain(sa)
    sa.end_of_speech()
    sb.end_of_speech()
    got_b += drain(sb)
    got_a += drain(sa)
    assert_same_frames(alone_a, got_a)
    assert_same_frames(alone_b, got_b)


def test_checkpoint_still_image_and_int16(tmp_path):
    """Engine.load from a saved student checkpoint; a single (H, W, 3) frame as the reference; int16 pushes."""
    from lipforcing.model import build_model
    from lipforcing.model.loading import save_model

    torch.manual_seed(0)
    student = build_model("tiny", causal=True)
    path = tmp_path / "student.safetensors"
    save_model(student, path)
    e = lipforcing.Engine.load(path, resolution=RES, backend="reference", text=torch.randn(1, 5, 32))
    assert e.config == student.config
    for a, b in zip(e.model.parameters(), student.parameters()):
        assert torch.equal(a, b)
    still = reference_frames(1)[0]
    s = e.session(still)
    assert tuple(s.reference.shape) == (1, RES, RES, 3)
    pcm = (speech(P + 160, seed=21) * 30000).astype(np.int16)
    s.push_audio(pcm)
    s.end_of_speech()
    frames = drain(s)
    assert [f.index for f in frames] == [0, 1]
    np.testing.assert_array_equal(frames[0].audio, pcm[:P].astype(np.float32) / 32768)
    with pytest.raises(ValueError, match="text_dim=32"):
        lipforcing.Engine.load(path, resolution=RES, text=torch.randn(1, 5, 7))


def test_engine_device_errors_name_the_argument():
    with pytest.raises(ValueError, match="device must be a device name.*'gpu'"):
        lipforcing.Engine.load(model="tiny", device="gpu")
    if not torch.cuda.is_available():          # was torch's "Torch not compiled with CUDA enabled" AssertionError
        with pytest.raises(ValueError, match="no CUDA GPU.*device='cpu'"):
            lipforcing.Engine.load(model="tiny", device="cuda")


def test_reference_dtype_and_closed_messages(engine):
    dtype = [torch.float32, torch.float16, torch.int16, torch.int32][np.random.default_rng().integers(4)]
    with pytest.raises(TypeError, match="uint8") as exc:
        engine.session(torch.zeros(2, RES, RES, 3, dtype=dtype))
    name = str(dtype).replace("torch.", "")
    assert f"got torch {name}" in str(exc.value) and "torch.torch" not in str(exc.value)
    assert "torch torch" not in str(exc.value)
    s = engine.session(reference_frames(2))
    s.close()
    for call in (lambda: s.push_audio(speech(P)), s.end_of_speech, s.interrupt, s.frames):
        with pytest.raises(RuntimeError, match=r"closed.*engine\.session"):
            call()
