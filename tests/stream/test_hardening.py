"""Hardening of the engine (issue 13): one bad chunk never poisons a session (non-finite values in a chunk step are
detected, the chunk's frames are the reference frames passed through, later chunks and utterances are as if it
never happened), read-only NumPy inputs give no warning, Engine.load picks the CPU thread count, and its file
arguments give errors that say what is wrong with the file."""
import logging
import warnings

import numpy as np
import pytest
import torch

import lipforcing
from tests.stream.helpers import BACKEND, RES, SMALL_VAE, assert_same_frames, drain, small_config, speech

P = 640
ENGINE_LOG = "lipforcing.engine"


class _Poisoned:
    """The engine's audio front end, except that push number ``n`` (1-based) of utterance ``u`` (0-based) returns
    NaN rows for every ``(u, n)`` in ``poison``: a stand-in for a front end that overflowed.  With ``only``, only
    the streams whose first samples are ``only`` are poisoned (sessions open their streams lazily, in the
    scheduler's thread)."""

    def __init__(self, inner, poison, only=None):
        self.inner, self.poison, self.only = inner, set(poison), only
        self.feature_dim, self.lookahead_samples = inner.feature_dim, inner.lookahead_samples

    def stream(self):
        return _PoisonedStream(self.inner.stream(), self.poison, self.only)


class _PoisonedStream:
    def __init__(self, inner, poison, only):
        self.inner, self.poison, self.only, self.utterance, self.calls = inner, poison, only, 0, 0
        self.armed = only is None

    def push(self, x):
        rows = self.inner.push(x)
        if self.utterance == 0 and self.calls == 0 and self.only is not None:
            n = min(len(self.only), x.numel())
            self.armed = bool(torch.equal(x[:n], torch.as_tensor(self.only[:n])))
        self.calls += 1
        if self.armed and (self.utterance, self.calls) in self.poison and rows.numel():
            rows = torch.full_like(rows, float("nan"))
        return rows

    def flush(self):
        return self.inner.flush()

    def reset(self):          # the runner resets its stream at each new utterance (the first one too)
        self.inner.reset()
        if self.calls:
            self.utterance += 1
        self.calls = 0


@pytest.fixture(scope="module")
def eng():
    e = lipforcing.Engine.load(model=small_config(), vae=SMALL_VAE, resolution=RES, seed=5, backend=BACKEND)
    yield e
    e.close()


def _utterances(engine, ref, pcms, *, seed=0):
    s = engine.session(ref, seed=seed)
    out = []
    for pcm in pcms:
        s.push_audio(pcm)
        s.end_of_speech()
        out.append(drain(s))
    s.close()
    return out


def test_a_non_finite_chunk_passes_the_reference_through_and_never_poisons_later_ones(eng, caplog):
    ref = np.random.randint(0, 256, (1, RES, RES, 3), dtype=np.uint8)     # a still image: every frame's reference
    seeds = np.random.randint(0, 1 << 30, 3)
    pcms = [speech(P * 40, seed=int(seeds[0])), speech(P * 30, seed=int(seeds[1])), speech(P * 20, seed=int(seeds[2]))]
    clean = _utterances(eng, ref, pcms)
    inner = eng.audio
    eng.audio = _Poisoned(inner, poison={(0, 2), (1, 2)})   # the 2nd chunk of utterances 0 and 1: NaN features
    try:
        with caplog.at_level(logging.WARNING, logger=ENGINE_LOG):
            poisoned = _utterances(eng, ref, pcms)
    finally:
        eng.audio = inner
    for utt_clean, utt_bad in zip(clean[:2], poisoned[:2]):
        assert [f.index for f in utt_clean] == [f.index for f in utt_bad]
        bad_chunk = sorted({f.chunk_id for f in utt_bad})[1]
        for fc, fb in zip(utt_clean, utt_bad):
            if fb.chunk_id == bad_chunk:      # passed through: exactly the reference frame, not black
                np.testing.assert_array_equal(fb.image, ref[0])
                np.testing.assert_array_equal(fb.face, ref[0])
                assert not np.array_equal(fc.image, ref[0])   # (the model's frame differs from the reference)
            elif fb.chunk_id < bad_chunk:
                np.testing.assert_array_equal(fb.image, fc.image)
            np.testing.assert_array_equal(fb.audio, fc.audio)
        later = [f for f in utt_bad if f.chunk_id > bad_chunk]
        assert later and all(f.image.any() and not np.array_equal(f.image, ref[0]) for f in later)
    warned = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(warned) == 2, warned
    # the next utterance is frame for frame the clean one: nothing of the bad chunks is left in the session
    assert_same_frames(clean[2], poisoned[2])


def test_a_non_finite_chunk_in_a_batched_step_touches_only_its_session(eng):
    ref_a = np.random.randint(0, 256, (1, RES, RES, 3), dtype=np.uint8)
    ref_b = np.random.randint(0, 256, (2, RES, RES, 3), dtype=np.uint8)
    pcm_a, pcm_b = speech(P * 33, seed=int(np.random.randint(1 << 30))), speech(P * 33, seed=5)
    clean_b = _utterances(eng, ref_b, [pcm_b], seed=3)[0]
    inner = eng.audio
    eng.audio = _Poisoned(inner, poison={(0, 2)}, only=pcm_a[:64])    # session a's stream only
    try:
        a, b = eng.session(ref_a), eng.session(ref_b, seed=3)
        before = dict(eng.stats()["batch_sizes"])
        with eng.scheduler.paused():           # both sessions' chunks become ready together: batched steps
            for s, pcm in ((a, pcm_a), (b, pcm_b)):
                s.push_audio(pcm)
                s.end_of_speech()
        got_a, got_b = drain(a), drain(b)
        a.close()
        b.close()
    finally:
        eng.audio = inner
    assert any(eng.stats()["batch_sizes"].get(n, 0) > before.get(n, 0) for n in (2, 3))
    assert_same_frames(clean_b, got_b)
    passed = [f for f in got_a if f.chunk_id == 1]
    assert passed and all(np.array_equal(f.image, ref_a[0]) for f in passed)
    assert all(f.image.any() and not np.array_equal(f.image, ref_a[0]) for f in got_a if f.chunk_id != 1)


def test_huge_finite_audio_is_refused_and_the_session_stays_usable(eng):
    ref = np.random.randint(0, 256, (3, RES, RES, 3), dtype=np.uint8)
    pcm = speech(P * 24, seed=int(np.random.randint(1 << 30)))
    clean = _utterances(eng, ref, [pcm])[0]
    s = eng.session(ref)
    s.push_audio(pcm[: P * 10])
    burst = pcm[:400].copy()
    burst[np.random.randint(0, 400, 4)] = np.float32(1e30)
    with pytest.raises(ValueError, match=r"^pcm has 4 sample\(s\) beyond"):
        s.push_audio(burst)
    s.push_audio(pcm[P * 10:])
    s.end_of_speech()
    assert_same_frames(clean, drain(s))
    s.close()


def test_read_only_numpy_inputs_give_no_warning(eng):
    ref = np.random.randint(0, 256, (2, RES, RES, 3), dtype=np.uint8)
    pcm = speech(P * 12, seed=3)
    ref.setflags(write=False)
    pcm.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = eng.session(ref)
        s.push_audio(pcm)
        s.push_audio((pcm * 32767).astype(np.int16)[: P])
        s.end_of_speech()
        frames = drain(s)
        s.close()
    assert len(frames) == 13


def test_engine_load_picks_the_cpu_thread_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        e = lipforcing.Engine.load(model=small_config(), vae=SMALL_VAE, resolution=RES, backend=BACKEND)
        assert torch.get_num_threads() == 1 and e.threads == 1      # tiny shapes: one thread
        e.close()
        e = lipforcing.Engine.load(model=small_config(), vae=SMALL_VAE, resolution=RES, backend=BACKEND, threads=2)
        assert torch.get_num_threads() == 2 and e.threads == 2
        e.close()
        for bad, exc in ((0, ValueError), (1.5, TypeError), (True, TypeError)):
            with pytest.raises(exc, match="threads"):
                lipforcing.Engine.load(model=small_config(), vae=SMALL_VAE, resolution=RES, threads=bad)
    finally:
        torch.set_num_threads(before)


def test_engine_load_file_arguments_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"vae '/missing/vae.pth': no such file"):
        lipforcing.Engine.load(model=small_config(), vae="/missing/vae.pth", resolution=RES)
    with pytest.raises(ValueError, match="unknown VAE preset"):      # a name that is not a path stays a preset error
        lipforcing.Engine.load(model=small_config(), vae="wan9", resolution=RES)
    from safetensors.torch import save_file

    good = tmp_path / "text.safetensors"
    save_file({"text": torch.randn(4, small_config().text_dim)}, good)
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:40])
    torch.save({"text": torch.randn(2, 2), "x": torch.nn.Identity()}, tmp_path / "obj.pt")
    bad = torch.randn(4, small_config().text_dim)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"text \(the prompt embedding\) holds 1 NaN/inf values"):
        lipforcing.Engine.load(model=small_config(), vae=SMALL_VAE, resolution=RES, text=bad)
    for name, match in (("cut.safetensors", "not a readable safetensors file"), ("obj.pt", "refusing to load"),
                        ("none.pt", "does not exist")):
        with pytest.raises((ValueError, FileNotFoundError), match=match) as info:
            lipforcing.Engine.load(model=small_config(), vae=SMALL_VAE, resolution=RES, text=tmp_path / name)
        assert str(tmp_path / name) in str(info.value) and "weights_only=False" not in str(info.value)
