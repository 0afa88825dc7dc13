"""ModelConfig presets and validation; parameter counts of the real presets on the meta device."""
import dataclasses

import pytest
import torch

import lipforcing
from lipforcing.config import ModelConfig
from lipforcing.model import build_model, count_parameters


def wan_t2v_parameters(dim, ffn, layers, in_dim=16, text_dim=4096, freq_dim=256, out_dim=16, patch=4):
    """Parameter count of a Wan2.1 T2V DiT, from its layer list (DESIGN.md section 2), no audio."""
    lin = lambda i, o: i * o + o  # noqa: E731
    block = (4 * lin(dim, dim) + 2 * dim          # self-attention q, k, v, o + RMSNorm q, k
             + 4 * lin(dim, dim) + 2 * dim        # cross-attention
             + 2 * dim                            # norm3 (affine)
             + lin(dim, ffn) + lin(ffn, dim)      # FFN
             + 6 * dim)                           # modulation
    return (in_dim * patch * dim + dim            # patch embedding (Conv3d 1x2x2)
            + lin(text_dim, dim) + lin(dim, dim)  # text embedding
            + lin(freq_dim, dim) + lin(dim, dim)  # time embedding
            + lin(dim, 6 * dim)                   # time projection
            + layers * block
            + lin(dim, patch * out_dim) + 2 * dim)  # head + head modulation


def omniavatar_audio_parameters(dim, layers, audio_dim=10752, token=32):
    return (4 * audio_dim * token + token + 2 * token    # AudioPack Linear + LayerNorm
            + (layers // 2 - 1) * (token * dim + dim))   # audio_cond_projs for blocks 2 .. L/2


@pytest.mark.parametrize("name,dim,ffn,layers,wan_size", [("1.3b", 1536, 8960, 30, 1.3e9),
                                                          ("14b", 5120, 13824, 40, 1.4e10)])
def test_parameter_counts_on_meta(name, dim, ffn, layers, wan_size):
    model = build_model(name, causal=True, device="meta")
    assert all(p.is_meta for p in model.parameters())
    n = count_parameters(model)
    base = wan_t2v_parameters(dim, ffn, layers)
    extra = omniavatar_audio_parameters(dim, layers) + (65 - 16) * 4 * dim  # audio + 49 conditioning channels
    print(f"\n{name}: {n:,} parameters (Wan2.1 T2V backbone {base:,} + audio/conditioning {extra:,})")
    assert n == base + extra
    assert 0.95 * wan_size < base < 1.12 * wan_size  # "1.3B" is 1.42e9, "14B" is 1.43e10
    assert extra < 0.005 * base
    teacher = build_model(name, causal=False, device="meta")
    assert count_parameters(teacher) == n


def test_presets_and_fields():
    tiny = ModelConfig.from_name("tiny")
    assert (tiny.dim, tiny.ffn_dim, tiny.num_heads, tiny.head_dim, tiny.num_layers) == (64, 128, 2, 32, 4)
    assert tiny.audio_layers == (2,) and tiny.text_dim == 32 and tiny.audio_dim == 16
    big = ModelConfig.from_name("14B")
    assert (big.dim, big.ffn_dim, big.num_heads, big.head_dim, big.num_layers) == (5120, 13824, 40, 128, 40)
    assert big.audio_layers == tuple(range(2, 21))  # 19 projections, blocks 2..20
    small = ModelConfig.from_name("1.3b")
    assert len(small.audio_layers) == 14 and small.head_dim == 128
    for c in (tiny, big, small):
        assert (c.in_dim, c.out_dim, c.patch_size, c.freq_dim, c.eps) == (65, 16, (1, 2, 2), 256, 1e-6)
        assert (c.chunk_frames, c.window_frames, c.sink_frames, c.audio_token_dim) == (3, 6, 1, 32)
        assert c.audio_injection == "add" and c.rope_mode in ("dynamic", "absolute")
    assert lipforcing.ModelConfig is ModelConfig
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny.dim = 3
    r = tiny.replace(rope_mode="absolute", audio_injection="cross_attn")
    assert r.rope_mode == "absolute" and r.audio_tokens_per_frame == 4 and tiny.rope_mode == "dynamic"
    assert ModelConfig.from_dict(r.to_dict()) == r


@pytest.mark.parametrize("change,match", [
    (dict(num_heads=3), "divisible by num_heads"),
    (dict(audio_injection="concat"), "audio_injection"),
    (dict(rope_mode="relative"), "rope_mode"),
    (dict(window_frames=2), "window_frames"),
    (dict(chunk_frames=0), "chunk_frames"),
    (dict(audio_window=4), "audio_window"),
    (dict(in_dim=8), "in_dim"),
    (dict(patch_size=(2, 2, 2)), "patch_size"),
    (dict(sink_frames=-1), "sink_frames"),
])
def test_validation_messages(change, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_name("tiny", **change)


def test_unknown_preset_and_types():
    with pytest.raises(ValueError, match="tiny"):
        ModelConfig.from_name("7b")
    with pytest.raises(TypeError, match="dim"):
        ModelConfig.from_name("tiny", dim=64.0)
    with pytest.raises(TypeError, match="causal"):
        build_model("tiny", causal="yes")


def test_build_dtype_and_device():
    m = build_model("tiny", causal=False, dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert all(torch.isfinite(p.float()).all() for p in m.parameters())
    # the modulation tables and head are random, not zero, so random-weight models exercise every term
    assert m.head.head.weight.abs().sum() > 0 and m.blocks[0].modulation.abs().sum() > 0


@pytest.mark.parametrize("injection", ["add", "cross_attn"])
def test_pass_flops_matches_flop_counter(injection):
    """pass_flops counts every matmul: the linear layers measured by torch's FlopCounterMode plus the attention
    products (opaque custom ops, added by hand here)."""
    from torch.utils.flop_counter import FlopCounterMode

    from lipforcing.model.flops import pass_flops

    cfg = ModelConfig.from_name("tiny", audio_injection=injection)
    model = build_model(cfg, causal=False).eval()
    frames, h, w, text = 3, 4, 6, 7
    lq = frames * (h // 2) * (w // 2)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 65, frames, h, w), torch.rand(1) * 1000, torch.randn(1, text, cfg.text_dim),
              torch.randn(1, frames, 4, cfg.audio_dim))
    a = cfg.audio_tokens_per_frame if injection == "cross_attn" else 0
    attention = cfg.num_layers * 4 * lq * cfg.dim * (lq + text + a)
    expected = pass_flops(cfg, tokens_per_frame=lq // frames, query_frames=frames, key_frames=frames,
                          text_len=text, text_kv=True)
    assert counter.get_total_flops() + attention == expected
