"""Compile tier for the Hopper audio_cross_attention kernel (csrc/audio_cross_attention_sm90.cu), no GPU needed.

* It is built for sm_90a in the shared build of tests/compile/conftest.py with no spills, and its SASS has the
  instructions it is written for: HGMMA (wgmma; P V reading V transposed), UTMALDG 4-d (q, text) and 5-d (audio
  windows), USETMAXREG, SYNCS (mbarriers); the compile report labels it (and the mma.sync kernel) by path.
* Host-side helpers checked against independent models: the wgmma descriptors of every k-step address the
  elements TMA's 128B swizzle put where the math needs them, the TMA views (4-d and 5-d, size-1 dims packed), the
  tile count of each CTA, and the argument checks (ValueError before any device use).
"""
import random

import pytest

from tests.compile.compile_report import cuda_rows

from tests.compile.sm90_layout import decode, swizzle, tma_addr

pytestmark = pytest.mark.compile

KERNEL = "audio_cross_attention_sm90_kernel"


@pytest.fixture(scope="module")
def ext(built_extension):
    if not hasattr(built_extension.module, "audio_cross_attention_sm90"):
        pytest.fail("the extension built for sm_80;sm_90 has no audio_cross_attention_sm90 binding")
    return built_extension.module


def test_compiles_for_sm90a_with_wgmma_tma_and_setmaxnreg(built_extension):
    # S = Q K^T is m64n64k16 (64-key tiles); P V is m64n{D}k16
    built_extension.check_sm90_kernel(KERNEL, lambda name: (
        "HGMMA.64x64x16.F32", "HGMMA.64x128x16.F32" if "Li128E" in name else "HGMMA.64x64x16.F32",
        "UTMALDG.4D", "UTMALDG.5D", "USETMAXREG", "SYNCS"))


def test_report_rows(built_extension):
    rows = cuda_rows(built_extension.log, built_extension.so_path, built_extension.module)
    sm90 = [r for r in rows if KERNEL in r["kernel"]]
    assert len(sm90) == 4, [r["kernel"] for r in rows]
    for r in sm90:
        d = 128 if ", 128>" in r["kernel"] else 64
        assert r["path"].startswith("sm_90") and r["spill_bytes"] == 0 and r["wgmma"] is not False, r
        assert r["smem_bytes"] >= built_extension.module.audio_cross_attention_sm90_smem_bytes(d), r
    mma = [r for r in rows if "audio_cross_attention_fwd_kernel" in r["kernel"]]
    assert mma and all(r["path"].startswith("sm_80-89") and r["wgmma"] is not True for r in mma), mma


def test_smem_fits_an_sm90_sm(ext):
    for d in (64, 128):
        assert 0 < ext.audio_cross_attention_sm90_smem_bytes(d) <= 227 * 1024
    assert ext.audio_cross_attention_sm90_smem_bytes(96) == 0
    assert ext.audio_cross_attention_sm90_smem_bytes(128) > ext.audio_cross_attention_sm90_smem_bytes(64)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_descriptors_address_the_tma_layout(ext, head_dim):
    """Every element each wgmma k-step reads (canonical K-major / MN-major layouts with the 128B swizzle, as in
    tests/compile/test_chunk_attention_sm90.py) is the element the math needs in the layout TMA wrote, for the
    audio kernel's tiles: Q 128 rows (two consumers of 64), K and V 64 keys."""
    block_m, block_n = ext.audio_cross_attention_sm90_tile
    assert (block_m, block_n) == (128, 64)
    rng = random.Random()
    base_q = 1024 * rng.randrange(0, 8)
    base_kv = base_q + 1024 * rng.randrange(32, 64)
    for kk in range(head_dim // 16):
        for consumer in (0, 1):
            start, _, sbo = decode(ext.audio_cross_attention_sm90_q_desc(base_q, consumer, kk))
            for m in range(64):
                for k in range(16):
                    hw = swizzle(start + (m // 8) * sbo + (m % 8) * 128 + 2 * k)
                    assert hw == tma_addr(base_q, block_m, 64 * consumer + m, 16 * kk + k), (kk, consumer, m, k)
        start, _, sbo = decode(ext.audio_cross_attention_sm90_k_desc(base_kv, kk))
        for n in range(block_n):  # B of S = Q K^T: key n, head_dim column 16 kk + k
            for k in range(16):
                hw = swizzle(start + (n // 8) * sbo + (n % 8) * 128 + 2 * k)
                assert hw == tma_addr(base_kv, block_n, n, 16 * kk + k), (kk, n, k)
    for kk in range(block_n // 16):  # B of O += P V: key 16 kk + k, head_dim column n
        start, lbo, sbo = decode(ext.audio_cross_attention_sm90_v_desc(base_kv, kk))
        for k in range(16):
            for n in range(head_dim):
                hw = swizzle(start + (n // 64) * lbo + (k // 8) * sbo + (k % 8) * 128 + 2 * (n % 64))
                assert hw == tma_addr(base_kv, block_n, 16 * kk + k, n), (kk, k, n)


def test_audio_tma_spec(ext):
    B, F, A, H, D = 2, 3, 32, 12, 128
    s = ext.audio_cross_attention_sm90_audio_tma_spec(B, F, A, H, D, [F * A * H * D, A * H * D, H * D, D], 64)
    assert s == {"dims": (D, H, A, F, B), "strides_bytes": (2 * D, 2 * H * D, 2 * A * H * D, 2 * F * A * H * D),
                 "box": (64, 1, 64, 1, 1)}
    # audio_k as a view of a fused (B, F, A, 2, H, D) projection: token stride 2 H D
    s = ext.audio_cross_attention_sm90_audio_tma_spec(B, F, A, H, D, [F * A * 2 * H * D, A * 2 * H * D, 2 * H * D, D],
                                                      64)
    assert s["strides_bytes"] == (2 * D, 4 * H * D, 4 * A * H * D, 4 * F * A * H * D)
    # size-1 dims (one head, one audio token, batch 1) get the packed stride, whatever torch reports
    s = ext.audio_cross_attention_sm90_audio_tma_spec(1, 5, 1, 1, 64, [7, 64, 3, 1], 64)
    assert s["dims"] == (64, 1, 1, 5, 1) and s["strides_bytes"] == (128, 128, 128, 5 * 128)


def _tiles_model(m_block, q_len, tpf, T, A, block_m=128, block_n=64):
    m0, m_end = m_block * block_m, min(m_block * block_m + block_m, q_len)
    frames = {r // tpf for r in range(m0, m_end)}
    return -(-T // block_n) + len(frames) * -(-A // block_n)


def test_tiles_per_cta(ext):
    rng = random.Random()
    cases = [(3 * 1024, 1024, 512, 32), (3 * 97, 97, 77, 7), (5 * 33, 33, 19, 1), (2 * 130, 130, 0, 64),
             (7 * 1, 1, 65, 129)]
    cases += [(f * t, t, rng.randrange(0, 600), rng.randrange(1, 200))
              for f, t in ((rng.randrange(1, 9), rng.randrange(1, 300)) for _ in range(20))]
    for q_len, tpf, T, A in cases:
        for m_block in range(-(-q_len // 128)):
            assert ext.audio_cross_attention_sm90_tiles(m_block, q_len, tpf, T, A) == \
                _tiles_model(m_block, q_len, tpf, T, A), (m_block, q_len, tpf, T, A)


def test_bad_arguments_raise_before_any_device_use(ext):
    B, F, tpf, H, D, T, A = 2, 3, 40, 4, 128, 16, 8
    good = dict(q=1 << 20, text_k=2 << 20, text_v=3 << 20, audio_k=4 << 20, audio_v=5 << 20, out=6 << 20,
                lse_text=7 << 20, lse_audio=8 << 20, batch=B, q_len=F * tpf, heads=H, head_dim=D, text_len=T,
                frames=F, audio_window=A, tokens_per_frame=tpf, q_strides=[F * tpf * H * D, H * D, D],
                text_k_strides=[T * H * D, H * D, D], text_v_strides=[T * H * D, H * D, D],
                audio_k_strides=[F * A * H * D, A * H * D, H * D, D],
                audio_v_strides=[F * A * H * D, A * H * D, H * D, D],
                out_strides=[F * tpf * H * D, H * D, D], scale=D ** -0.5, audio_scale=1.0, dtype=2, stream=0)
    for bad, match in ((dict(head_dim=96), "64 or 128"), (dict(head_dim=32), "64 or 128"), (dict(dtype=0), "dtype"),
                       (dict(dtype=7), "dtype"), (dict(q=(1 << 20) + 8), "aligned"),
                       (dict(q_len=F * tpf + 1), "frames \\* tokens_per_frame"),
                       (dict(audio_k_strides=[F * A * H * D, 0, H * D, D]), "audio strides"),
                       (dict(text_v_strides=[T * H * D, 0, D]), "strides"),
                       (dict(audio_v_strides=[1, 2]), "audio_v_strides must have 4"),
                       (dict(heads=70000), "65535")):
        with pytest.raises(ValueError, match=match):
            ext.audio_cross_attention_sm90(**{**good, **bad})
    if ext.device_count():
        return  # the call below would launch on bogus pointers
    # empty text: its (unused) strides are not checked
    with pytest.raises((RuntimeError, ValueError)) as info:
        ext.audio_cross_attention_sm90(**{**good, "text_len": 0, "text_k": 0, "text_v": 0,
                                          "text_k_strides": [0, 0, 0], "text_v_strides": [0, 0, 0]})
    assert info.type is RuntimeError, info.value  # passed every check; failed only for want of a device


def test_hopper_primitives_have_one_definition():
    """The sm_90 kernels share one copy of their PTX primitives (lipforcing/sm90_primitives.cuh)."""
    import glob
    import os

    from tests.kernel_helpers import ROOT

    files = glob.glob(os.path.join(ROOT, "csrc", "**", "*.c*"), recursive=True)
    files += glob.glob(os.path.join(ROOT, "csrc", "include", "lipforcing", "*.h"))
    for ptx in ("wgmma.mma_async", "mbarrier.try_wait", "cp.async.bulk.tensor", "setmaxnreg.inc.sync", "wgmma.fence.sync",
                "cuTensorMapEncodeTiled\", &f", "constexpr uint64_t wgmma_desc_sw128("):
        defining = sorted(os.path.relpath(f, ROOT) for f in files if ptx in open(f).read())
        assert defining == ["csrc/include/lipforcing/sm90_primitives.cuh"], (ptx, defining)
