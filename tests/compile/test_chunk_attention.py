"""Compile tier for chunk_attention and block_causal_attention.

* The Triton kernels compile for sm_80 and sm_90 with the launchers' real GPU tile configs (bf16, head_dim 128),
  in a subprocess without TRITON_INTERPRET, and fit each GPU's shared memory.
* csrc/chunk_attention.cu compiles with nvcc for sm_80 and sm_90 in the shared build of tests/compile/conftest.py
  (no spills reported by ptxas; `pip install` builds every default arch), and the extension
  built by CMake exposes ``chunk_attention`` whose launcher symbol is in the shared object; bad parameters raise
  ValueError before any device is touched.
"""
import textwrap

import pytest

from tests.kernel_helpers import SMEM_LIMIT, compile_in_subprocess

pytestmark = pytest.mark.compile

_COMPILE_SCRIPT = textwrap.dedent("""
    import json
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from lipforcing.kernels import block_causal_attention as bca
    from lipforcing.kernels import chunk_attention as ca
    from lipforcing.kernels._attention_common import block_d, launch_config

    ELEM = {"Q", "K", "V", "KC", "VC", "OUT", "O", "DO", "DQ", "DK", "DV"}
    TYPES = {"POS": "*i64", "COS": "*fp32", "SIN": "*fp32", "LSE": "*fp32", "DELTA": "*fp32",
             "qk_scale": "fp32", "sm_scale": "fp32"}

    def build(kernel, constexprs, cc):
        constexprs = dict(constexprs)
        opts = dict(num_warps=constexprs.pop("num_warps"), num_stages=constexprs.pop("num_stages"))
        sig = {n: "constexpr" if n in constexprs else "*bf16" if n in ELEM else TYPES.get(n, "i32")
               for n in kernel.arg_names}
        k = triton.compile(ASTSource(kernel, signature=sig, constexprs=constexprs),
                           target=GPUTarget("cuda", cc, 32), options=opts)
        return {"kernel": kernel.__name__, "cc": cc, "shared": k.metadata.shared, "asm": sorted(k.asm)}

    D = 128
    fwd = launch_config(D, torch.bfloat16)
    bwd = launch_config(D, torch.bfloat16, backward=True)
    tiles = lambda c: dict(BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], num_warps=c["num_warps"],
                           num_stages=c["num_stages"])
    t, th = ca._rope_parts(D)
    chunk = dict(HEAD_DIM=D, ROPE_T=t, ROPE_TH=th, BLOCK_D=block_d(D), BLOCK_DH=block_d(D // 2),
                 DOT_PRECISION="tf32", **tiles(fwd))
    mask = dict(HAS_WINDOW=True, HEAD_DIM=D, BLOCK_D=block_d(D), DOT_PRECISION="tf32")
    jobs = []
    for cc in (80, 90):
        jobs += [(ca._chunk_attention_fwd_kernel, dict(chunk, ROPE=True), cc),
                 (bca._block_causal_fwd_kernel, dict(mask, **tiles(fwd)), cc)]
    jobs += [(ca._chunk_attention_fwd_kernel, dict(chunk, ROPE=False), 90),
             (ca._chunk_cache_write_kernel, dict(HEAD_DIM=D, BLOCK_T=32, BLOCK_D=D, num_warps=4, num_stages=1), 90),
             (bca._bwd_delta_kernel, dict(HEAD_DIM=D, BLOCK_M=bwd["BLOCK_M"], BLOCK_D=D, num_warps=4,
                                          num_stages=1), 90),
             (bca._block_causal_bwd_dkdv_kernel, dict(mask, **tiles(bwd)), 90),
             (bca._block_causal_bwd_dq_kernel, dict(mask, **tiles(bwd)), 90)]
    print(json.dumps([build(*job) for job in jobs]))
""")


def test_triton_kernels_compile_for_sm80_and_sm90():
    built = compile_in_subprocess(_COMPILE_SCRIPT, timeout=1200)
    assert {(b["kernel"], b["cc"]) for b in built} >= {("_chunk_attention_fwd_kernel", 80),
                                                       ("_chunk_attention_fwd_kernel", 90),
                                                       ("_block_causal_fwd_kernel", 90),
                                                       ("_block_causal_bwd_dkdv_kernel", 90),
                                                       ("_block_causal_bwd_dq_kernel", 90)}
    for b in built:
        assert "cubin" in b["asm"] and "ptx" in b["asm"], b
        assert b["shared"] <= SMEM_LIMIT[b["cc"]], f"{b['kernel']} sm_{b['cc']} needs {b['shared']} bytes of smem"


def test_cuda_kernels_compile_without_spills(built_extension):
    spills = built_extension.spill_bytes("chunk_attention_fwd_kernel")
    assert set(spills) >= {80, 90}, "ptxas reported no chunk_attention_fwd_kernel for sm_80/sm_90"
    assert max(spills.values()) == 0, f"register spills in chunk_attention_fwd_kernel: {spills}"


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
