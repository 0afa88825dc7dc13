"""Interoperability with diffusers' independent implementation of the Wan2.1 transformer (``WanTransformer3DModel``).

A tiny random diffusers model is saved with ``save_pretrained`` and loaded by lipforcing; both networks must give the
same velocity (fp32, relative error < 1e-4).  diffusers is a test extra: the module is skipped without it.
"""
import json
import shutil

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers  # noqa: E402

import lipforcing  # noqa: E402
from lipforcing.config import ModelConfig  # noqa: E402
from lipforcing.model import build_model  # noqa: E402
from lipforcing.model.audio import group_audio_frames  # noqa: E402
from lipforcing.model.diffusers_format import (config_from_diffusers, convert_diffusers_state_dict,  # noqa: E402
                                               is_diffusers_transformer, load_diffusers_transformer)
from lipforcing.model.loading import CheckpointError  # noqa: E402

TOL = 1e-4
TEXT_DIM = 32


def make_reference(in_channels=16, heads=2, head_dim=16, layers=2, ffn=64, freq_dim=32):
    """A tiny WanTransformer3DModel with every parameter random (norm scales around 1, modulation tables,
    biases and the output projection non-zero, unlike diffusers' init)."""
    model = WanTransformer3DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=in_channels,
                                  out_channels=16, text_dim=TEXT_DIM, freq_dim=freq_dim, ffn_dim=ffn,
                                  num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.2))
    return model.eval()


def save(model, path, **kwargs):
    model.save_pretrained(path, **kwargs)
    return path


def inputs(batch=2, frames=5, height=6, width=4, text_len=7, in_dim=65):
    x = torch.randn(batch, in_dim, frames, height, width)
    ctx = torch.randn(batch, text_len, TEXT_DIM)
    return x, ctx


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def reference_out(ref, x, t, ctx, tokens_per_frame):
    """diffusers' output; a per-frame timestep (B, F) becomes diffusers' per-token (B, F * tokens_per_frame)."""
    if t.dim() == 2:
        t = t.repeat_interleave(tokens_per_frame, dim=1)
    with torch.no_grad():
        return ref(x, t, ctx).sample


@pytest.mark.parametrize("per_frame_t", [False, True])
def test_t2v_checkpoint_matches_diffusers(tmp_path, per_frame_t):
    """A plain 16-channel T2V checkpoint: our 65-channel model equals diffusers on the 16 noisy channels, and the
    49 extra (conditioning) channels have no effect (zero weights)."""
    ref = make_reference(in_channels=16)
    ours = load_diffusers_transformer(save(ref, tmp_path / "t2v"), causal=False).eval()
    assert ours.config.in_dim == 65 and ours.patch_embedding.weight.shape[1] == 65
    x, ctx = inputs()
    B, _, Fr, H, W = x.shape
    t = torch.rand(B, Fr) * 1000 if per_frame_t else torch.rand(B) * 1000
    expected = reference_out(ref, x[:, :16], t, ctx, (H // 2) * (W // 2))
    with torch.no_grad():
        got = ours(x, t, ctx)
        x2 = x.clone()
        x2[:, 16:] = torch.randn_like(x2[:, 16:])
        got2 = ours(x2, t, ctx)
    assert got.shape == expected.shape == (B, 16, Fr, H, W)
    assert rel(got, expected) < TOL
    torch.testing.assert_close(got2, got, rtol=0, atol=0)


def test_65_channel_checkpoint_matches_diffusers(tmp_path):
    ref = make_reference(in_channels=65, head_dim=32)
    ours = load_diffusers_transformer(save(ref, tmp_path / "c65"), causal=False).eval()
    assert ours.config.in_dim == 65 and ours.config.head_dim == 32
    x, ctx = inputs(frames=3, height=4, width=6)
    t = torch.rand(x.shape[0]) * 1000
    expected = reference_out(ref, x, t, ctx, 6)
    with torch.no_grad():
        got = ours(x, t, ctx)
        x2 = x.clone()
        x2[:, 16:] = torch.randn_like(x2[:, 16:])
        got2 = ours(x2, t, ctx)
    assert rel(got, expected) < TOL
    assert rel(got2, got) > 1e-3  # the conditioning channels are used


def test_causal_student_one_chunk_matches_diffusers(tmp_path):
    """The causal student from the same checkpoint, with one chunk covering every frame and no window, is the
    bidirectional network: full-sequence block-causal forward and one streaming chunk both equal diffusers."""
    ref = make_reference(in_channels=16)
    path = save(ref, tmp_path / "t2v")
    x, ctx = inputs(frames=4)
    B, _, Fr, H, W = x.shape
    t = torch.rand(B) * 1000
    expected = reference_out(ref, x[:, :16], t, ctx, (H // 2) * (W // 2))
    for rope_mode in ("absolute", "dynamic"):
        student = load_diffusers_transformer(path, causal=True, chunk_frames=Fr, window_frames=None,
                                             rope_mode=rope_mode).eval()
        assert student.causal
        with torch.no_grad():
            assert rel(student(x, t, ctx), expected) < TOL
            state = student.init_stream(ctx, max_frames=Fr)
            assert rel(student.forward_chunk(x, t, state, write=False), expected) < TOL


@pytest.mark.parametrize("audio_injection", ["add", "cross_attn"])
def test_missing_audio_modules_are_zero(tmp_path, audio_injection):
    """A diffusers checkpoint has no audio modules: they load zero-initialised, so audio changes nothing."""
    ref = make_reference(in_channels=16, layers=4)
    ours = load_diffusers_transformer(save(ref, tmp_path / "t2v"), causal=False,
                                      audio_injection=audio_injection, audio_dim=8).eval()
    x, ctx = inputs(frames=3)
    t = torch.rand(x.shape[0]) * 1000
    audio = group_audio_frames(torch.randn(x.shape[0], 1 + 4 * (x.shape[2] - 1), 8))
    with torch.no_grad():
        without = ours(x, t, ctx)
        with_audio = ours(x, t, ctx, audio)
    torch.testing.assert_close(with_audio, without, rtol=1e-6, atol=1e-6)
    assert rel(without, reference_out(ref, x[:, :16], t, ctx, 6)) < TOL


def test_key_mapping_agrees_with_diffusers_converter():
    """diffusers' own official->diffusers converter, applied to our (Wan-native) key names, gives exactly the
    diffusers model's keys and shapes, and our conversion inverts it."""
    cfg = ModelConfig.from_name("tiny", in_dim=16)
    native = {k: torch.randn(v.shape) for k, v in build_model(cfg, causal=False, device="meta").state_dict().items()
              if not (k.startswith("audio_") or "_audio." in k)}
    as_diffusers = convert_wan_transformer_to_diffusers(dict(native))
    ref = WanTransformer3DModel(num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim, in_channels=16,
                                out_channels=16, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim,
                                num_layers=cfg.num_layers)
    assert {k: tuple(v.shape) for k, v in as_diffusers.items()} == {k: tuple(v.shape)
                                                                    for k, v in ref.state_dict().items()}
    back = convert_diffusers_state_dict(as_diffusers, cfg)
    for k, v in native.items():
        assert back[k] is v or torch.equal(back[k], v), k


def test_config_from_diffusers():
    ref = make_reference(in_channels=16, heads=2, head_dim=16, layers=2, ffn=64, freq_dim=32)
    cfg = config_from_diffusers(dict(ref.config))
    assert (cfg.dim, cfg.num_heads, cfg.ffn_dim, cfg.num_layers) == (32, 2, 64, 2)
    assert (cfg.in_dim, cfg.out_dim, cfg.text_dim, cfg.freq_dim, cfg.patch_size) == (65, 16, TEXT_DIM, 32, (1, 2, 2))
    assert config_from_diffusers(dict(ref.config), chunk_frames=2, window_frames=4).window_frames == 4
    with pytest.raises(ValueError, match="image_dim"):
        config_from_diffusers({**ref.config, "image_dim": 1280, "added_kv_proj_dim": 32})
    with pytest.raises(ValueError, match="cross_attn_norm"):
        config_from_diffusers({**ref.config, "cross_attn_norm": False})
    with pytest.raises(ValueError, match="ffn_dim"):
        config_from_diffusers(dict(ref.config), ffn_dim=128)
    with pytest.raises(ValueError, match="AutoencoderKLWan"):
        config_from_diffusers({"_class_name": "AutoencoderKLWan"})


def test_detection_and_file_forms(tmp_path):
    """Folder, weights file with config.json beside it, pipeline folder, sharded weights; and what is not one."""
    ref = make_reference(in_channels=16)
    folder = save(ref, tmp_path / "pipe" / "transformer")
    sharded = save(ref, tmp_path / "sharded", max_shard_size="20KB")
    assert (sharded / "diffusion_pytorch_model.safetensors.index.json").exists()
    weights = folder / "diffusion_pytorch_model.safetensors"
    for p in (folder, weights, tmp_path / "pipe", sharded):
        assert is_diffusers_transformer(p), p
    x, ctx = inputs(frames=2)
    t = torch.rand(x.shape[0]) * 1000
    with torch.no_grad():
        outs = [load_diffusers_transformer(p, causal=False)(x, t, ctx) for p in (folder, weights, sharded)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=0, atol=0)

    assert not is_diffusers_transformer(tmp_path / "nope")
    assert not is_diffusers_transformer(tmp_path / "pipe" / "transformer" / "config.json")
    native = tmp_path / "native"
    native.mkdir()
    shutil.copy(weights, native / "model.safetensors")
    assert not is_diffusers_transformer(native / "model.safetensors")  # no config.json beside it
    (native / "config.json").write_text(json.dumps({"_class_name": "WanModel", "dim": 32}))
    assert not is_diffusers_transformer(native)  # the official Wan format is not diffusers


def test_config_that_does_not_match_the_weights(tmp_path):
    ref = make_reference(in_channels=16)
    good = save(ref, tmp_path / "good")
    for change, needle in (({"num_layers": 3}, "(diffusers blocks.2."),
                           ({"ffn_dim": 96}, "blocks.0.ffn.net.0.proj.weight"),
                           ({"text_dim": 48}, "condition_embedder.text_embedder.linear_1.weight")):
        bad = tmp_path / f"bad_{next(iter(change))}"
        shutil.copytree(good, bad)
        cfg = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(CheckpointError) as info:
            load_diffusers_transformer(bad, causal=False)
        msg = str(info.value)
        assert needle in msg and "config.json" in msg, msg
        assert len(msg) < 3000  # a capped listing, not hundreds of lines

    # weights with a key diffusers' T2V model does not have (an I2V image embedder)
    from safetensors.torch import load_file, save_file

    extra = tmp_path / "extra"
    shutil.copytree(good, extra)
    sd = load_file(extra / "diffusion_pytorch_model.safetensors")
    sd["condition_embedder.image_embedder.norm1.weight"] = torch.ones(4)
    del sd["blocks.1.norm2.bias"]
    save_file(sd, extra / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="image_embedder") as info:
        load_diffusers_transformer(extra, causal=False)
    assert "blocks.1.norm2.bias" in str(info.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(good / "config.json", empty / "config.json")
    with pytest.raises(CheckpointError, match="no weights"):
        load_diffusers_transformer(empty, causal=False)


def test_lipforcing_load_model_reads_diffusers_folders(tmp_path):
    """The public loader: ``lipforcing.load_model(folder)`` (student by default, teacher with causal=False)."""
    ref = make_reference(in_channels=16)
    path = save(ref, tmp_path / "t2v")
    teacher = lipforcing.load_model(path, causal=False).eval()
    student = lipforcing.load_model(path, dtype=torch.bfloat16)
    assert student.causal and student.dtype == torch.bfloat16 and not teacher.causal
    x, ctx = inputs(frames=3)
    t = torch.rand(x.shape[0]) * 1000
    with torch.no_grad():
        assert rel(teacher(x, t, ctx), reference_out(ref, x[:, :16], t, ctx, 6)) < TOL


# transformer/config.json of the Wan2.1-T2V-1.3B-Diffusers and -14B-Diffusers releases
RELEASED = {
    "1.3b": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
    "14b": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),
}
RELEASED_COMMON = {"_class_name": "WanTransformer3DModel", "added_kv_proj_dim": None, "cross_attn_norm": True,
                   "eps": 1e-06, "freq_dim": 256, "image_dim": None, "in_channels": 16, "out_channels": 16,
                   "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024,
                   "text_dim": 4096}


@pytest.mark.parametrize("preset", ["1.3b", "14b"])
def test_released_configs_give_the_presets(preset):
    cfg = {**RELEASED_COMMON, **RELEASED[preset]}
    assert config_from_diffusers(cfg) == ModelConfig.from_name(preset)


def test_full_size_1_3b_keys_and_shapes_convert():
    """diffusers' 1.3B transformer built on the meta device (no memory): every key and shape converts onto our
    1.3b preset."""
    cfg = {k: v for k, v in {**RELEASED_COMMON, **RELEASED["1.3b"]}.items() if not k.startswith("_")}
    with torch.device("meta"):
        ref = WanTransformer3DModel(**cfg)
    ours = convert_diffusers_state_dict(ref.state_dict(), ModelConfig.from_name("1.3b"))
    expected = build_model("1.3b", causal=True, device="meta").state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in expected.items()}
