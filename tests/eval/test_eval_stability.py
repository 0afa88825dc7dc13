"""The stability part of ``lipforcing eval`` (``long_seconds``): a system that lip-syncs perfectly and then
collapses to copying its input mid-stream must show it in the first-third vs last-third columns."""
from __future__ import annotations

import numpy as np
import pytest


class _CollapsingSystem:
    """Whole-clip system: the world's true frames for the audio up to ``collapse`` (a fraction of the clip), the
    input (reference) video after it.  It finds the true person by matching the reference against the clips the
    world made during the run."""

    def __init__(self, clips: list, collapse: float):
        self.clips, self.collapse, self.calls = clips, collapse, 0

    def generate(self, reference, audio):
        from lipforcing.eval.runner import truth_frames

        self.calls += 1
        T = len(reference)
        clip = next(c for c in self.clips if c.ref_frames is not None and len(c.ref_frames) >= T
                    and np.array_equal(c.ref_frames[:T], reference))
        sub = truth_frames(clip, np.asarray(audio, np.float32))[:T] if len(clip.frames) == T else None
        if sub is None:                                      # the warm-up piece: a prefix of a longer clip
            return reference.copy(), 1.0
        cut = int(self.collapse * T)
        return np.concatenate([sub[:cut], reference[cut:]]), 123.0


def test_stability_sees_a_mid_stream_collapse(monkeypatch, tmp_path):
    import lipforcing.world
    from lipforcing.eval.runner import EvalConfig, evaluate, write_report

    made = []
    real = lipforcing.world.make_clip

    def recording(*a, **kw):
        c = real(*a, **kw)
        made.append(c)
        return c

    monkeypatch.setattr(lipforcing.world, "make_clip", recording)
    seed = int(np.random.default_rng().integers(0, 1000))
    sys_ = _CollapsingSystem(made, collapse=0.5)
    cfg = EvalConfig(clips=1, seconds=2, size=32, speech="synthetic", seed=seed, long_seconds=24)
    res = evaluate({"collapsing": sys_}, cfg)
    st = res["stability"]["collapsing"]
    assert st["seconds"] == 24 and st["fps"] == 123.0
    # synced, then not (24 s: 7 windows per third; over 20 seeds first 0.60-0.84, last -0.20-0.26)
    first, last = st["first"]["sync"], st["last"]["sync"]
    assert first > 0.45 and last < 0.4 and first - last > 0.25
    assert st["first"]["mouth_psnr"] > 60 > st["last"]["mouth_psnr"]                 # exact truth, then the input
    long_clip = made[-1]
    assert len(long_clip.frames) == 600 and long_clip.identity.split == "eval"      # held-out person, 24 s
    assert "ground_truth" not in res["stability"]
    _, md = write_report(res, tmp_path)
    line = next(r for r in md.read_text().splitlines() if r.startswith("| collapsing | 24 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert float(cells[2]) == pytest.approx(st["first"]["sync"], rel=2e-3)
    assert float(cells[3]) == pytest.approx(st["last"]["sync"], abs=2e-3)
