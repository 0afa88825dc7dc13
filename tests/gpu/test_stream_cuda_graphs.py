"""GPU tier: the streaming engine on CUDA, with and without captured CUDA graphs (skipped without a GPU)."""
import numpy as np
import pytest
import torch

import lipforcing

pytestmark = pytest.mark.gpu

P = 640
RES = 32


def _speech(n, seed):
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000.0
    return (0.3 * np.sin(2 * np.pi * 170 * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)


def _run(engine, ref, pcm, pieces):
    s = engine.session(ref, seed=3)
    out = []
    for i in range(0, len(pcm), pieces):
        s.push_audio(pcm[i:i + pieces])
        out += list(s.frames())
    s.end_of_speech()
    out += list(s.frames())
    # a second utterance: the graphs must survive the in-place cache reset
    s.push_audio(pcm[: P * 15])
    s.end_of_speech()
    out += list(s.frames())
    graphs = s._runner.graphs
    s.close()
    return out, graphs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_match_eager(dtype):
    ref = np.random.default_rng(0).integers(0, 256, (5, RES, RES, 3), dtype=np.uint8)
    pcm = _speech(P * 45 + 100, seed=1)
    eager = lipforcing.Engine.load(model="tiny", device="cuda", dtype=dtype, resolution=RES, seed=2)
    graphed = lipforcing.Engine.load(model="tiny", device="cuda", dtype=dtype, resolution=RES, seed=2,
                                     cuda_graphs=True)
    a, g_none = _run(eager, ref, pcm, 320)
    b, g = _run(graphed, ref, pcm, 320)
    assert g_none is None and g is not None           # the graphed engine really replayed graphs
    assert len(a) == len(b) == 46 + 15
    for fa, fb in zip(a, b):
        assert (fa.index, fa.pts, fa.chunk_id) == (fb.index, fb.pts, fb.chunk_id)
        diff = np.abs(fa.image.astype(np.int16) - fb.image.astype(np.int16)).max()
        assert diff <= 1, (fa.index, diff)            # same kernels; allow one uint8 step of rounding


def test_cuda_split_invariance_and_no_host_growth():
    ref = np.random.default_rng(4).integers(0, 256, (5, RES, RES, 3), dtype=np.uint8)
    pcm = _speech(P * 30 + 7, seed=5)
    e = lipforcing.Engine.load(model="tiny", device="cuda", resolution=RES, cuda_graphs=True)
    a, _ = _run(e, ref, pcm, len(pcm))
    b, _ = _run(e, ref, pcm, 160)
    for fa, fb in zip(a, b):
        np.testing.assert_array_equal(fa.image, fb.image)
    # device memory is flat over a longer stream once the graphs exist
    s = e.session(ref, seed=1)
    s.push_audio(_speech(P * 40, seed=6))
    list(s.frames())
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for k in range(20):
        s.push_audio(_speech(P * 12, seed=7 + k))
        list(s.frames())
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= before + (1 << 20)
    s.close()
