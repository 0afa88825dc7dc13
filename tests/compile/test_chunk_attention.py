"""Compile tier for chunk_attention.

* Every Triton kernel of the op, captured at the settings its launchers really use (the public op called at the
  1.3B shapes through tests/compile/compile_report.py), compiles for sm_90a with no register spills, the attention
  kernels (forward, dq, dk/dv) with wgmma, within the shared memory of an sm_80 SM (the launch settings do not
  depend on the architecture).
* csrc/chunk_attention.cu compiles with nvcc for sm_80 and sm_90 in the shared build of tests/compile/conftest.py
  (no spills reported by ptxas; `pip install` builds every default arch) with cp.async and ldmatrix in its SASS,
  and the extension
  built by CMake exposes ``chunk_attention`` whose launcher symbol is in the shared object; bad parameters raise
  ValueError before any device is touched.
"""
import textwrap

import pytest

from tests.kernel_helpers import SMEM_LIMIT, compile_in_subprocess

pytestmark = pytest.mark.compile

_COMPILE_SCRIPT = textwrap.dedent("""
    import json
    from tests.compile import compile_report as cr

    print(json.dumps(cr.triton_rows(("chunk_attention",))))
""")

ATTENTION_KERNELS = ("_chunk_attention_fwd_kernel", "_chunk_attention_split_fwd_kernel", "_chunk_bwd_dq_kernel",
                     "_chunk_bwd_dkdv_kernel")


def test_triton_kernels_compile_for_sm90_without_spills():
    rows = compile_in_subprocess(_COMPILE_SCRIPT, timeout=1200)
    for r in rows:
        assert "error" not in r, r
    names = {r["kernel"].split(".")[-1] for r in rows}
    assert names >= set(ATTENTION_KERNELS) | {"_rope_rows_kernel", "_rope_slots_kernel", "_chunk_cache_write_kernel",
                                             "_chunk_split_combine_kernel"}
    for r in rows:
        assert r["smem_bytes"] <= SMEM_LIMIT[80], f"{r['kernel']} needs {r['smem_bytes']} bytes of smem"
        assert r["spill_bytes"] == 0, f"{r['kernel']} ({r['config']}) spills {r['spill_bytes']} bytes"
        if r["kernel"].split(".")[-1] in ATTENTION_KERNELS:
            assert r["wgmma"], f"{r['kernel']} ({r['config']}) does not use wgmma"


def test_cuda_kernels_compile_without_spills(built_extension):
    spills = built_extension.spill_bytes("chunk_attention_fwd_kernel")
    assert set(spills) >= {80, 90}, "ptxas reported no chunk_attention_fwd_kernel for sm_80/sm_90"
    assert max(spills.values()) == 0, f"register spills in chunk_attention_fwd_kernel: {spills}"


@pytest.mark.parametrize("arch", [80, 90])
def test_cuda_kernel_uses_cp_async_and_ldmatrix(built_extension, arch):
    """The mma.sync kernel copies K/V tiles with cp.async (LDGSTS) and reads every operand fragment with ldmatrix
    (LDSM: Q once, K and V (.trans) per tile): 1 + 2 x 4 x (head_dim / 16) per instantiation, no scalar loads."""
    for name, d in (("chunk_attention_fwd_kernelI6__halfLi128ELb1", 128),
                    ("chunk_attention_fwd_kernelI13__nv_bfloat16Li64ELb0", 64)):
        ops = built_extension.sass_opcodes(name, arch)
        assert ops.get("LDGSTS", 0) > 0 and ops.get("LDGDEPBAR", 0) > 0, (name, arch, ops)
        assert ops.get("LDSM", 0) == (d // 16) * (1 + 2 * 4), (name, arch, ops)


def test_extension_has_chunk_attention(built_extension):
    # the module is stripped (pybind11 release build); the kernels' registration names stay in the binary
    blob = built_extension.binary()
    for kernel in (b"chunk_attention_fwd_kernelI6__halfLi128ELb1E", b"chunk_attention_fwd_kernelI13__nv_bfloat16Li64",
                   b"chunk_cache_write_kernel", b"advance_pos_kernel"):
        assert kernel in blob, kernel
    ext = built_extension.module
    assert hasattr(ext, "chunk_attention")
    good = dict(q=0, k=0, v=0, k_cache=0, v_cache=0, pos=0, out=0, rope_cos=0, rope_sin=0, strides=[0] * 18,
                batch=1, n=8, heads=1, head_dim=64, chunk_size=8, window=16, sink=0, grid_h=1, grid_w=1, scale=1.0,
                dtype=1, write=False, stream=0)
    # argument errors come before any device use, so they are checkable without a GPU
    for bad, match in ((dict(head_dim=96), "head_dim"), (dict(dtype=0), "dtype"), (dict(strides=[0] * 3), "strides"),
                       (dict(window=4), "window"), (dict(rope_cos=16), "rope")):
        with pytest.raises(ValueError, match=match):
            ext.chunk_attention(**{**good, **bad})
