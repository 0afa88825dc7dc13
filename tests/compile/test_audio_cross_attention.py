"""Compile tier for audio_cross_attention: the Triton kernels compile for sm_80 and sm_90 with the launchers' real
tile configs (in a subprocess without TRITON_INTERPRET), within each GPU's shared memory; the CUDA extension built
with nvcc has the kernel with cp.async and ldmatrix in its SASS and no spills, exposes ``audio_cross_attention``
and rejects bad parameters with ValueError before touching a device.

Each Triton compile takes tens of seconds on a small CPU, so only the bf16 configs are compiled (fp16 shares the
code path; fp32 differs only by the IEEE dot precision).
"""
import textwrap

import pytest

from tests.kernel_helpers import SMEM_LIMIT, compile_in_subprocess

pytestmark = pytest.mark.compile

_COMPILE_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from lipforcing.kernels import audio_cross_attention as m

    ELEM = {"Q", "TK", "TV", "AK", "AV", "Out", "DO", "DQ", "DTK", "DTV", "DAK", "DAV"}
    FP32_PTR = {"LseT", "LseA", "DeltaT", "DeltaA"}
    FLOATS = {"qk_scale", "audio_scale", "scale"}

    def build(kernel, constexprs, options, cc):
        sig = {}
        for name in kernel.arg_names:
            sig[name] = ("constexpr" if name in constexprs else "*bf16" if name in ELEM else
                         "*fp32" if name in FP32_PTR else "fp32" if name in FLOATS else "i32")
        k = triton.compile(ASTSource(kernel, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", cc, 32),
                           options=options)
        return {"kernel": kernel.__name__, "cc": cc, "shared": k.metadata.shared, "asm": sorted(k.asm)}

    D, A = 128, 32
    common = dict(BLOCK_A=m._block_a(A), BLOCK_D=D, DOT_PRECISION="tf32")
    fwd = m._fwd_config(D, torch.bfloat16)
    bwd, kv = m._bwd_config(D, torch.bfloat16)
    fopt = dict(num_warps=fwd.pop("num_warps"), num_stages=fwd.pop("num_stages"))
    bopt = dict(num_warps=bwd.pop("num_warps"), num_stages=bwd.pop("num_stages"))
    kvopt = dict(num_warps=kv.pop("num_warps"), num_stages=kv.pop("num_stages"))
    aopt = dict(num_warps=m._AUDIO_BWD_WARPS, num_stages=kvopt["num_stages"])
    jobs = [(m._audio_cross_attention_fwd_kernel, {**common, **fwd}, fopt, 80),
            (m._audio_cross_attention_fwd_kernel, {**common, **fwd}, fopt, 90),
            (m._audio_cross_attention_bwd_dq_kernel, {**common, **bwd, "ONE_A_TILE": True}, bopt, 90),
            (m._audio_cross_attention_bwd_dkdv_text_kernel,
             dict(BLOCK_M=kv["BLOCK_M"], BLOCK_N=kv["BLOCK_N"], BLOCK_D=D, DOT_PRECISION="tf32"), kvopt, 90),
            (m._audio_cross_attention_bwd_dkdv_audio_kernel,
             dict(BLOCK_M=kv["BLOCK_M"], BLOCK_A=m._block_a_bwd(A), BLOCK_D=D, ONE_A_TILE=True, DOT_PRECISION="tf32"),
             aopt, 90)]
    print(json.dumps([build(*job) for job in jobs]))
""")


def test_triton_kernels_compile_for_sm80_and_sm90():
    built = compile_in_subprocess(_COMPILE_SCRIPT, timeout=900, env={"TRITON_DEFAULT_FP_FUSION": "1"})
    assert {(b["kernel"], b["cc"]) for b in built} >= {("_audio_cross_attention_fwd_kernel", 80),
                                                       ("_audio_cross_attention_fwd_kernel", 90)}
    for b in built:
        assert "cubin" in b["asm"] and "ptx" in b["asm"], b
        assert 0 < b["shared"] <= SMEM_LIMIT[b["cc"]], f"{b['kernel']} sm_{b['cc']} needs {b['shared']} bytes of smem"


@pytest.mark.parametrize("arch", [80, 90])
def test_cuda_kernel_uses_cp_async_and_ldmatrix(built_extension, arch):
    """K/V tiles through cp.async (LDGSTS) and every operand fragment by ldmatrix (LDSM), for both branches:
    per branch Q and K (D / 16 x (1 + 2)) and V (.trans, D / 16 x 2), no spills."""
    for name, d in (("audio_cross_attention_fwd_kernelI6__halfLi128", 128),
                    ("audio_cross_attention_fwd_kernelI13__nv_bfloat16Li96", 96)):
        ops = built_extension.sass_opcodes(name, arch)
        assert ops.get("LDGSTS", 0) > 0 and ops.get("LDGDEPBAR", 0) > 0, (name, arch, ops)
        assert ops.get("LDSM", 0) == 2 * (d // 16) * 5, (name, arch, ops)
    spills = built_extension.spill_bytes("audio_cross_attention_fwd_kernel")
    assert set(spills) >= {80, 90} and max(spills.values()) == 0, spills


@pytest.fixture
def ext(built_extension):
    return built_extension.module


def _good_args(**change):
    B, F, tpf, H, D, T, A = 1, 2, 3, 2, 64, 5, 4
    args = dict(q=256, text_k=512, text_v=768, audio_k=1024, audio_v=1280, out=1536, lse_text=1792, lse_audio=2048,
                batch=B, q_len=F * tpf, heads=H, head_dim=D, text_len=T, frames=F, audio_window=A,
                tokens_per_frame=tpf, q_strides=[F * tpf * H * D, H * D, D], text_k_strides=[T * H * D, H * D, D],
                text_v_strides=[T * H * D, H * D, D], audio_k_strides=[F * A * H * D, A * H * D, H * D, D],
                audio_v_strides=[F * A * H * D, A * H * D, H * D, D], out_strides=[F * tpf * H * D, H * D, D],
                scale=D ** -0.5, audio_scale=1.0, dtype=2, stream=0)
    args.update(change)
    return args


def test_cuda_launcher_is_in_the_extension(ext):
    assert hasattr(ext, "audio_cross_attention")
    if ext.device_count() == 0:
        # Valid parameters get as far as the device check (fake pointers are never dereferenced).
        with pytest.raises(RuntimeError, match="audio_cross_attention"):
            ext.audio_cross_attention(**_good_args())


@pytest.mark.parametrize("change,match", [
    (dict(head_dim=48), "head_dim must be 32, 64, 96 or 128"),
    (dict(dtype=0), "float16 or bfloat16"),
    (dict(q=264), "16-byte aligned"),
    (dict(q_len=7), "q_len must equal frames"),
    (dict(audio_window=0), "audio_window >= 1"),
    (dict(q_strides=[768, 130, 64]), "multiple of 8"),
    (dict(audio_k_strides=[1, 2, 3]), "audio_k_strides must have 4 entries"),
])
def test_cuda_launcher_rejects_bad_parameters(ext, change, match):
    with pytest.raises(ValueError, match=match):
        ext.audio_cross_attention(**_good_args(**change))
