"""Compile tier for denoise_update.

* The Triton kernel compiles for sm_80 and sm_90 (fp32 / bf16 / fp16, every noise and time mode the launcher
  uses) in a subprocess without TRITON_INTERPRET; the Philox rounds use 32-bit multiply-high instructions.
* csrc/denoise_update.cu compiles with nvcc for sm_80 and sm_90 (shared build of tests/compile/conftest.py) without
  register spills (`pip install` builds every default arch), and the extension built by
  CMake exports ``denoise_update`` and embeds the kernels; bad arguments raise ValueError before any device use.
"""
import textwrap

import pytest

from tests.kernel_helpers import compile_in_subprocess

pytestmark = pytest.mark.compile

_COMPILE_SCRIPT = textwrap.dedent("""
    import json
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from lipforcing.kernels import denoise_update as du

    def build(cc, elem, noise_mode, t_mode, tn_mode, int64):
        k = du._denoise_update_kernel
        idx = "i64" if int64 else "i32"
        types = dict(x_ptr=elem, flow_ptr=elem, noise_ptr=elem, x0_ptr=elem, xn_ptr=elem, t_ptr="*fp32",
                     t_value="fp32", tn_ptr="*fp16", tn_value="fp32", omtn_value="fp32", seed_ptr="*i64",
                     seed_value="i64", offset_ptr="*i64", offset_value="i64", numel=idx, per_sample=idx)
        constexprs = dict(T_MODE=t_mode, TN_MODE=tn_mode, NOISE_MODE=noise_mode, SEED_PTR=True, OFFSET_PTR=False,
                          INT64=int64, LIBDEVICE=True, BLOCK=du.BLOCK)
        sig = {n: "constexpr" if n in constexprs else types[n] for n in k.arg_names}
        c = triton.compile(ASTSource(k, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", cc, 32),
                           options=dict(num_warps=du.NUM_WARPS, enable_fp_fusion=False))
        ptx = c.asm["ptx"]
        return {"cc": cc, "elem": elem, "noise": noise_mode, "asm": sorted(c.asm), "shared": c.metadata.shared,
                "mulhi": ptx.count("mul.hi.u32")}

    jobs = [(cc, "*fp32", du._NOISE_PHILOX, du._PER_SAMPLE, du._TENSOR0D, False) for cc in (80, 90)]
    jobs += [(90, "*bf16", du._NOISE_TENSOR, du._SCALAR, du._SCALAR, False),
             (90, "*fp16", du._NO_NOISE, du._TENSOR0D, du._SCALAR, False),
             (80, "*bf16", du._NOISE_PHILOX, du._SCALAR, du._SCALAR, True)]
    print(json.dumps([build(*j) for j in jobs]))
""")


def test_triton_kernel_compiles_for_sm80_and_sm90():
    built = compile_in_subprocess(_COMPILE_SCRIPT, timeout=900)
    assert len(built) == 5
    for b in built:
        assert "cubin" in b["asm"] and "ptx" in b["asm"], b
        assert b["shared"] == 0, b  # a pure streaming kernel: no shared memory
        if b["noise"] == 2:  # Philox: 10 rounds x 2 multiply-high per element (unrolled over the block)
            assert b["mulhi"] >= 20, b
        else:
            assert b["mulhi"] == 0, b


def test_cuda_kernels_compile_without_spills(built_extension):
    for kernel in ("denoise_update_vec_kernel", "denoise_update_generic_kernel"):
        spills = built_extension.spill_bytes(kernel)
        assert set(spills) >= {80, 90}, f"ptxas reported no {kernel} for sm_80/sm_90"
        assert max(spills.values()) == 0, f"register spills in {kernel}: {spills}"


def test_extension_has_denoise_update(built_extension):
    # The module is stripped (pybind11 Release), so look for the kernels' names in the embedded fatbinary.
    blob = built_extension.binary()
    assert b"denoise_update_vec_kernel" in blob and b"denoise_update_generic_kernel" in blob
    ext = built_extension.module
    assert hasattr(ext, "denoise_update")
    good = dict(x_t=256, flow=256, noise=0, x0_out=256, x_next_out=256, x_dtype=0, noise_dtype=0, x0_dtype=0,
                x_next_dtype=0, t_mode=0, t=0, t_dtype=0, t_value=0.999, t_next_mode=0, t_next=0, t_next_dtype=0,
                t_next_value=0.769, seed=0, seed_value=1, offset=0, offset_value=0, numel=10, per_sample=10, stream=0)
    # argument errors come before any device use, so they are checkable without a GPU
    for bad, match in ((dict(x_dtype=3), "x_t dtype"), (dict(x0_dtype=-1), "x0_out dtype"),
                       (dict(t_mode=1), "t_mode"), (dict(t_next_mode=7, t_next=256), "t_next_mode"),
                       (dict(x_t=0), "device pointers"), (dict(per_sample=0), "per_sample")):
        with pytest.raises(ValueError, match=match):
            ext.denoise_update(**{**good, **bad})
    ext.denoise_update(**{**good, "numel": 0})  # nothing to do: returns without touching a device
    if ext.device_count() == 0:
        with pytest.raises(RuntimeError, match="CUDA|device"):
            ext.denoise_update(**good)
