"""Compile tier: the sm_90 compile report of every kernel (tests/compile/compile_report.py).

Writes build/compile_report_sm90.json (rows {"kernel", "regs", "spill_bytes", "smem_bytes", "wgmma"}, kernel names
"<op>.<kernel>" for Triton, "cuda.<signature>" for the extension, whose rows also say which GPUs run them
("path": the sm_90a wgmma kernel, the mma.sync kernels of sm_80-89), with the CUDA rows when nvcc is there (the
session's shared build of tests/compile/conftest.py).  A copy from a full run is kept in bench/results/.
"""
import os

import pytest

from tests.compile.compile_report import REPORT_NAME, cuda_rows, write_report
from tests.kernel_helpers import ROOT, SMEM_LIMIT, compile_in_subprocess

pytestmark = pytest.mark.compile

OPS = ("block_causal_attention", "audio_cross_attention", "chunk_attention", "denoise_update")
# kernels whose sm_90 build must not spill and must use wgmma (the attention kernels of these two ops)
STRICT = {
    "block_causal_attention": ("_block_causal_fwd_kernel", "_block_causal_bwd_dkdv_kernel",
                               "_block_causal_bwd_dq_kernel"),
    "audio_cross_attention": ("_audio_cross_attention_fwd_kernel", "_audio_cross_attention_bwd_dq_kernel",
                              "_audio_cross_attention_bwd_dkdv_text_kernel",
                              "_audio_cross_attention_bwd_dkdv_audio_kernel"),
}


@pytest.fixture(scope="module")
def report(request):
    rows = compile_in_subprocess("import json\nfrom tests.compile.compile_report import triton_rows\n"
                                 "print(json.dumps(triton_rows()))", timeout=1800,
                                 env={"TRITON_DEFAULT_FP_FUSION": "1"})
    try:
        built = request.getfixturevalue("built_extension")
    except pytest.skip.Exception:
        built = None
    if built is not None:
        rows += cuda_rows(built.log, built.so_path, built.module)
    write_report(rows, os.path.join(ROOT, "build", REPORT_NAME))
    return rows


def test_every_kernel_of_every_op_compiles_for_sm90(report):
    errors = [r for r in report if "error" in r]
    assert not errors, "\n\n".join(f"{r['kernel']}:\n{r['error']}" for r in errors)
    names = [r["kernel"] for r in report]
    for op in OPS:
        assert any(n.startswith(op + ".") for n in names), f"no kernel of {op} in the report: {names}"
    for op, kernels in STRICT.items():
        for k in kernels:
            assert f"{op}.{k}" in names, f"{op}.{k} missing"
    for r in report:
        assert set(r) >= {"kernel", "regs", "spill_bytes", "smem_bytes", "wgmma"}, r
        assert 0 < r["regs"] <= 255 and r["smem_bytes"] <= SMEM_LIMIT[90], r


def test_attention_kernels_do_not_spill_and_use_wgmma(report):
    rows = {r["kernel"]: r for r in report}
    bad = [f"{name}: {rows[name]['spill_bytes']} B spilled, wgmma={rows[name]['wgmma']}"
           for op, kernels in STRICT.items() for name in (f"{op}.{k}" for k in kernels)
           if rows[name]["spill_bytes"] or not rows[name]["wgmma"]]
    assert not bad, "\n".join(bad)


def test_cuda_sm90_kernels_use_wgmma_without_spills(report):
    """The extension's Hopper kernels (chunk_attention_sm90_kernel, fp16/bf16 x head_dim 64/128) are in the report
    with HGMMA in their SASS, no spills, and their dynamic shared memory counted; the mma.sync chunk kernel is
    labelled as the sm_80-89 path."""
    cuda = [r for r in report if r["kernel"].startswith("cuda.")]
    if not cuda:
        pytest.skip("no CUDA rows (nvcc not on PATH)")
    sm90 = [r for r in cuda if "chunk_attention_sm90_kernel" in r["kernel"]]
    assert len(sm90) == 4, [r["kernel"] for r in cuda]
    for r in sm90:
        assert r["wgmma"] is not False and r["spill_bytes"] == 0, r
        assert 64 * 1024 < r["smem_bytes"] <= SMEM_LIMIT[90], r
        assert r["path"].startswith("sm_90"), r
    mma = [r for r in cuda if "chunk_attention_fwd_kernel" in r["kernel"]]
    assert mma and all(r["path"].startswith("sm_80-89") and r["wgmma"] is not True for r in mma), mma
