"""Decoders: TAEHV (``taew2_1`` architecture) vs the Wan VAE's streaming decoder, one steady-state chunk each.

A chunk is 3 latent frames -> 12 video frames (the stream's first chunk, which gives 9, is the warm-up and is not
timed).  Both decoders get the same random latents, random weights (speed does not depend on their values) and
the engine's settings (a whole chunk per decoder call; TAEHV channels-last on a GPU).  MACs are counted by
forward hooks on every convolution (2 FLOPs per MAC); TFLOP/s = FLOPs per chunk / median time.

* ``test_bench_decoder_gpu`` (gpu marker): 512x512 frames, bf16 and fp16, CUDA-event timing through
  ``bench_record`` (rows in bench/results/*.json).  Target (issue 15): TAEHV < 10 ms per chunk and >= 20x faster
  than the Wan VAE on an H100/H200.
* ``test_bench_decoder_cpu`` (no marker; runs here): 32x32 frames in fp32 on the CPU, pytest-benchmark timing;
  the TAEHV row prints its ratio to the Wan VAE row measured in the same run.

Run: ``pytest bench/test_bench_decoder.py`` (CPU) or ``pytest bench/test_bench_decoder.py -m gpu``.
"""
from __future__ import annotations

import pytest
import torch

from lipforcing.decoders import TAEHV, TAEHVStreamDecoder
from lipforcing.vae import WanVAE

DECODERS = ["wan-vae", "taehv"]       # wan-vae first: the taehv test prints the ratio to it
LATENTS_PER_CHUNK = 3
_results: dict = {}
_macs: dict = {}                      # (tag, name) -> MACs per frame


def count_macs(module: torch.nn.Module, fn) -> int:
    """Multiply-accumulates of every Conv2d/Conv3d that ``fn()`` runs inside ``module``."""
    total = []

    def hook(mod, inp, out):
        k = 1
        for s in mod.kernel_size:
            k *= s
        total.append(out.numel() * (mod.in_channels // mod.groups) * k)

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (torch.nn.Conv2d,
                                                                                        torch.nn.Conv3d))]
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return sum(total)


def _setup(name: str, device: str, dtype: torch.dtype, pixels: int):
    """(stream decoder warmed up on its first chunk, the timed chunk's latents, the module doing the work)."""
    torch.manual_seed(0)
    h = pixels // 8
    first = torch.randn(1, 16, LATENTS_PER_CHUNK, h, h, device=device, dtype=dtype)
    chunk = torch.randn(1, 16, LATENTS_PER_CHUNK, h, h, device=device, dtype=dtype)
    with torch.device(device):
        if name == "wan-vae":
            module = WanVAE("wan2.1").to(dtype=dtype).eval().requires_grad_(False)
            dec = module.stream_decoder(latents_per_step=LATENTS_PER_CHUNK)
        else:
            module = TAEHV("taew2_1").to(dtype=dtype).eval().requires_grad_(False)
            if device == "cuda":
                module = module.to(memory_format=torch.channels_last)
            dec = TAEHVStreamDecoder(module)
    with torch.inference_mode():
        dec.decode(first)
    return dec, chunk, module


def _flops_per_chunk(dec, chunk, module) -> float:
    with torch.inference_mode():
        return 2.0 * count_macs(module, lambda: dec.decode(chunk))


def _report(tag: str, times: dict, name: str, macs: dict) -> None:
    """The comparison line, once both decoders of ``tag`` ran; ``macs``: name -> MACs per frame."""
    if name == "taehv" and "wan-vae" in times:
        print(f"\ndecoder {tag}: taehv {times['taehv'] * 1e3:.2f} ms, wan-vae {times['wan-vae'] * 1e3:.2f} ms per "
              f"12-frame chunk -> taehv {times['wan-vae'] / times['taehv']:.1f}x faster; GMAC per frame: taehv "
              f"{macs['taehv'] / 1e9:.3f}, wan-vae {macs['wan-vae'] / 1e9:.3f} "
              f"({macs['wan-vae'] / macs['taehv']:.1f}x fewer MACs)")


@pytest.mark.parametrize("name", DECODERS)
def test_bench_decoder_cpu(benchmark, name):
    if torch.cuda.is_available():
        pytest.skip("a GPU machine measures test_bench_decoder_gpu (keeps bench/gpu_session.sh's bench stage short)")
    torch.set_num_threads(1)
    pixels = 32
    dec, chunk, module = _setup(name, "cpu", torch.float32, pixels)
    flops = _flops_per_chunk(dec, chunk, module)

    def fn():
        with torch.inference_mode():
            return dec.decode(chunk)

    out = benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
    assert out.shape == (1, 3, 12, pixels, pixels)
    median = benchmark.stats.stats.median
    _results[("cpu", name)] = median
    macs_per_frame = _macs[("cpu", name)] = flops / 2 / 12
    benchmark.extra_info.update({"pixels": pixels, "frames": 12, "macs_per_frame": macs_per_frame,
                                 "gflops_per_s": flops / median / 1e9})
    _report(f"cpu {pixels}x{pixels} fp32 1 thread",
            {k[1]: v for k, v in _results.items() if k[0] == "cpu"}, name,
            {k[1]: v for k, v in _macs.items() if k[0] == "cpu"})


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", DECODERS)
def test_bench_decoder_gpu(bench_record, name, dtype):
    pixels = 512
    dec, chunk, module = _setup(name, "cuda", dtype, pixels)
    flops = _flops_per_chunk(dec, chunk, module)

    def fn():
        with torch.inference_mode():
            return dec.decode(chunk)

    row = bench_record("decoder", name, {"pixels": pixels, "latents": LATENTS_PER_CHUNK, "frames": 12}, dtype, fn,
                       flops=flops, warmup=3, rounds=20)
    row.extra["macs_per_frame"] = _macs[(str(dtype), name)] = flops / 2 / 12
    _results[(str(dtype), name)] = row.median_us * 1e-6
    times = {k[1]: v for k, v in _results.items() if k[0] == str(dtype)}
    if name == "taehv" and "wan-vae" in times:
        row.extra["speedup_vs_wan_vae"] = times["wan-vae"] / times["taehv"]
    _report(f"gpu {pixels}x{pixels} {str(dtype).replace('torch.', '')} ({row.tflops:.1f} TFLOP/s)", times, name,
            {k[1]: v for k, v in _macs.items() if k[0] == str(dtype)})
