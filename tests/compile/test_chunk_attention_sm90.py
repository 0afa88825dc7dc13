"""Compile tier for the Hopper chunk_attention kernel (csrc/chunk_attention_sm90.cu), no GPU needed.

* It is built for sm_90a in the shared build of tests/compile/conftest.py, with no spills, and its SASS has the
  Hopper instructions it is written for: HGMMA (wgmma), UTMALDG (TMA loads), USETMAXREG (register hand-over
  between the producer and the consumer warpgroups).
* The host-side helpers it uses are checked here: the wgmma shared-memory descriptor bits, the descriptors of
  every k-step (emulated: the address the hardware computes for each operand element under the canonical
  128B-swizzle layouts, which must be where TMA's 128B swizzle put that element), the TMA box parameters, and the
  argument checks (ValueError before any device use).
"""
import random

import pytest

from tests.compile.sm90_layout import decode, swizzle, tma_addr

pytestmark = pytest.mark.compile

KERNEL = "chunk_attention_sm90_kernel"


@pytest.fixture(scope="module")
def ext(built_extension):
    if not hasattr(built_extension.module, "chunk_attention_sm90"):
        pytest.fail("the extension built for sm_80;sm_90 has no chunk_attention_sm90 binding")
    return built_extension.module


def test_sm90_kernel_compiles_for_sm90a_with_wgmma_tma_and_setmaxnreg(built_extension):
    sass = built_extension.check_sm90_kernel(KERNEL, ("HGMMA.64x128x16.F32", "UTMALDG.4D", "USETMAXREG", "SYNCS"))
    mma = [text for name, text in sass.items() if "chunk_attention_fwd_kernel" in name]
    assert mma and all("HGMMA" not in t and "HMMA" in t for t in mma)  # the sm_80-89 path: mma.sync


def test_descriptor_bit_layout(ext):
    # start 0x1400 >> 4 = 0x140 in bits 0-13, LBO 16 >> 4 = 1 in bits 16-29, SBO 1024 >> 4 = 64 in bits 32-45,
    # 128B swizzle = 1 in bits 62-63
    assert ext.chunk_attention_sm90_desc(0x1400, 16, 1024) == 0x140 | (1 << 16) | (64 << 32) | (1 << 62)
    rng = random.Random()
    for _ in range(200):
        addr, lbo, sbo = (rng.randrange(0, 1 << 18) & ~15 for _ in range(3))
        d = ext.chunk_attention_sm90_desc(addr, lbo, sbo)
        assert d & 0x3FFF == addr >> 4 and (d >> 16) & 0x3FFF == lbo >> 4 and (d >> 32) & 0x3FFF == sbo >> 4
        assert (d >> 49) & 7 == 0 and d >> 62 == 1 and (d >> 14) & 3 == 0 and (d >> 30) & 3 == 0
        assert (d >> 46) & 7 == 0 and (d >> 52) & 0x3FF == 0


def test_swizzle_offset_matches_the_model(ext):
    for row in range(128):
        for chunk in range(8):
            assert ext.chunk_attention_sm90_swizzle_offset(row, chunk) == swizzle(row * 128 + chunk * 16)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_descriptors_address_the_tma_layout(ext, head_dim):
    """Every element each wgmma k-step reads, addressed through the descriptor the kernel builds (canonical
    layouts of the PTX ISA / CUTLASS GMMA descriptors, 128B swizzle), is the element the math needs in the
    layout TMA wrote.  K-major ((8, m), (64 elements)) with SBO between 8-row groups; MN-major
    ((64 elements, n), (8, k)) with LBO between 64-element blocks along N and SBO between 8-row groups along K."""
    block_m, block_n = ext.chunk_attention_sm90_tile
    rng = random.Random()
    base_q = 1024 * rng.randrange(0, 8)
    base_kv = base_q + 1024 * rng.randrange(16, 64)
    for kk in range(head_dim // 16):
        for row0 in (0, 64):  # consumer warpgroup 0 / 1: A = its 64 Q rows
            start, _, sbo = decode(ext.chunk_attention_sm90_kmajor_desc(base_q, block_m, row0, kk))
            for m in range(64):
                for k in range(16):
                    hw = swizzle(start + (m // 8) * sbo + (m % 8) * 128 + 2 * k)
                    assert hw == tma_addr(base_q, block_m, row0 + m, 16 * kk + k), (kk, row0, m, k)
        start, _, sbo = decode(ext.chunk_attention_sm90_kmajor_desc(base_kv, block_n, 0, kk))
        for n in range(block_n):  # B of S = Q K^T: key n, head_dim column 16 kk + k
            for k in range(16):
                hw = swizzle(start + (n // 8) * sbo + (n % 8) * 128 + 2 * k)
                assert hw == tma_addr(base_kv, block_n, n, 16 * kk + k), (kk, n, k)
    for kk in range(block_n // 16):  # B of O += P V: key 16 kk + k, head_dim column n
        start, lbo, sbo = decode(ext.chunk_attention_sm90_v_desc(base_kv, kk))
        for k in range(16):
            for n in range(head_dim):
                hw = swizzle(start + (n // 64) * lbo + (k // 8) * sbo + (k % 8) * 128 + 2 * (n % 64))
                assert hw == tma_addr(base_kv, block_n, 16 * kk + k, n), (kk, k, n)


def test_tma_spec(ext):
    B, T, H, D = 2, 3072, 12, 128
    s = ext.chunk_attention_sm90_tma_spec(B, T, H, D, [T * H * D, H * D, D], 128)
    assert s == {"dims": (D, H, T, B), "strides_bytes": (2 * D, 2 * H * D, 2 * T * H * D), "box": (64, 1, 128, 1)}
    # q as a view of a fused (B, T, 3, H, D) projection: token stride 3 H D, head stride D
    s = ext.chunk_attention_sm90_tma_spec(B, T, H, D, [T * 3 * H * D, 3 * H * D, D], 128)
    assert s["strides_bytes"] == (2 * D, 2 * 3 * H * D, 2 * T * 3 * H * D)
    # size-1 dimensions: any stride is legal in torch, TMA gets the packed one (a multiple of 16 bytes)
    s = ext.chunk_attention_sm90_tma_spec(1, 7, 1, 64, [3, 64, 1], 128)
    assert s["strides_bytes"] == (128, 128, 7 * 128) and s["dims"] == (64, 1, 7, 1)
    s = ext.chunk_attention_sm90_tma_spec(2, 1, 4, 64, [256, 5, 64], 128)
    assert s["strides_bytes"] == (128, 512, 512)


def test_smem_fits_an_sm90_sm(ext):
    for d in (64, 128):
        assert 0 < ext.chunk_attention_sm90_smem_bytes(d) <= 227 * 1024
    assert ext.chunk_attention_sm90_smem_bytes(96) == 0


def test_bad_arguments_raise_before_any_device_use(ext):
    good = dict(q=1 << 20, k=2 << 20, v=3 << 20, out=4 << 20, count=5 << 20,
                strides=[8 * 128 * 4, 4 * 128, 128] * 4, batch=2, n=8, slots=8, heads=4, head_dim=128, scale=1.0,
                dtype=2, stream=0)
    for bad, match in ((dict(head_dim=96), "head_dim"), (dict(dtype=0), "dtype"), (dict(dtype=7), "dtype"),
                       (dict(strides=[0] * 3), "strides"), (dict(q=(1 << 20) + 8), "aligned"),
                       (dict(count=0), "pointers"), (dict(n=0), ">= 1"),
                       (dict(strides=[8 * 128 * 4, 4 * 128, 100] + [8 * 128 * 4, 4 * 128, 128] * 3), "multiples"),
                       (dict(heads=70000), "65535")):
        with pytest.raises(ValueError, match=match):
            ext.chunk_attention_sm90(**{**good, **bad})
