"""Checkpoint loading: Wan-native keys round trip (safetensors, sharded, .pt), clear errors, pickled objects
refused, LoRA merge, 16 -> 65 patch-embedding expansion, missing audio modules."""
import argparse
import json

import pytest
import torch
from safetensors.torch import save_file

import lipforcing
from lipforcing.config import ModelConfig
from lipforcing.model import build_model
from lipforcing.model.loading import CheckpointError, load_model, save_model
from tests.model.helpers import make_inputs

WAN_KEYS = ["patch_embedding.weight", "patch_embedding.bias", "text_embedding.0.weight", "text_embedding.2.weight",
            "time_embedding.0.weight", "time_embedding.2.weight", "time_projection.1.weight",
            "blocks.0.self_attn.q.weight", "blocks.0.self_attn.norm_q.weight", "blocks.0.self_attn.norm_k.weight",
            "blocks.0.norm3.weight", "blocks.0.norm3.bias", "blocks.0.cross_attn.o.weight",
            "blocks.0.cross_attn.norm_k.weight", "blocks.3.ffn.0.weight", "blocks.3.ffn.2.bias",
            "blocks.0.modulation", "head.head.weight", "head.modulation", "audio_proj.proj.weight",
            "audio_proj.norm_out.weight", "audio_cond_projs.0.weight"]


def _outputs(model, inputs):
    with torch.no_grad():
        return model(*inputs)


@pytest.fixture
def tiny_model():
    return build_model(ModelConfig.from_name("tiny"), causal=True).eval()


def test_key_names_are_wan_native(tiny_model):
    keys = set(tiny_model.state_dict())
    assert set(WAN_KEYS) <= keys
    assert "audio_cond_projs.1.weight" not in keys  # tiny: one projection (block 2)
    assert tuple(tiny_model.state_dict()["patch_embedding.weight"].shape) == (64, 65, 1, 2, 2)
    assert tuple(tiny_model.state_dict()["blocks.0.modulation"].shape) == (1, 6, 64)


def test_round_trip_safetensors_with_config_metadata(tiny_model, tmp_path):
    path = tmp_path / "student.safetensors"
    save_model(tiny_model, path)
    inputs = make_inputs(tiny_model.config, frames=3)
    loaded = lipforcing.load_model(path)  # config from the metadata
    assert loaded.config == tiny_model.config and loaded.causal
    for (k, a), (k2, b) in zip(tiny_model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert all(p.requires_grad and not p.is_meta for p in loaded.parameters())
    torch.testing.assert_close(_outputs(loaded.eval(), inputs), _outputs(tiny_model, inputs), rtol=0, atol=0)
    teacher = load_model(path, causal=False, dtype=torch.bfloat16)
    assert not teacher.causal and {p.dtype for p in teacher.parameters()} == {torch.bfloat16}


def test_official_wan_folder_with_wanmodel_config_loads(tiny_model, tmp_path):
    # the official Wan2.1 release folders carry a config.json with "_class_name": "WanModel" next to native keys
    folder = tmp_path / "Wan2.1-official"
    folder.mkdir()
    save_model(tiny_model, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps({"_class_name": "WanModel", "model_type": "t2v"}))
    loaded = load_model(folder)
    inputs = make_inputs(tiny_model.config, frames=3)
    torch.testing.assert_close(_outputs(loaded.eval(), inputs), _outputs(tiny_model, inputs), rtol=0, atol=0)


def test_sharded_index_and_pt_and_prefixes(tiny_model, tmp_path):
    sd = tiny_model.state_dict()
    keys = list(sd)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: sd[k].contiguous() for k in ks}, tmp_path / name)
        weight_map.update({k: name for k in ks})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    from_dir = load_model(tmp_path, config="tiny")  # config inferred is also possible; here given by name
    from_index = load_model(tmp_path / "model.safetensors.index.json")  # config inferred from the shapes
    assert from_index.config == tiny_model.config
    pt = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, pt)  # wrapped and prefixed
    from_pt = load_model(pt, config=tiny_model.config)
    for m in (from_dir, from_index, from_pt):
        for k, v in m.state_dict().items():
            assert torch.equal(v, sd[k]), k


def test_missing_unexpected_and_shape_errors_are_listed(tiny_model, tmp_path):
    sd = dict(tiny_model.state_dict())
    # truncated: block 3 removed entirely
    trunc = {k: v for k, v in sd.items() if not k.startswith("blocks.3.")}
    save_file(trunc, tmp_path / "trunc.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path / "trunc.safetensors", config="tiny")
    msg = str(info.value)
    assert "missing keys (27)" in msg and "blocks.3.ffn.0.weight" in msg and "... and 15 more" in msg
    assert len(msg) < 2500
    # renamed key and a wrong shape
    bad = dict(sd)
    bad["blocks.1.ffn.zero.weight"] = bad.pop("blocks.1.ffn.0.weight")
    bad["head.head.weight"] = torch.zeros(3, 64)
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path / "bad.safetensors", config="tiny")
    msg = str(info.value)
    assert "missing keys (1): blocks.1.ffn.0.weight" in msg
    assert "unexpected keys (1): blocks.1.ffn.zero.weight" in msg
    assert "head.head.weight: checkpoint (3, 64) vs model (64, 64)" in msg


def test_pickled_object_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"weights": torch.zeros(1), "obj": argparse.Namespace(cmd="echo")}, path)  # not a tensor type
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_model(path, config="tiny")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        (tmp_path / "x.npz").write_bytes(b"0")
        load_model(tmp_path / "x.npz", config="tiny")


def test_lora_merge(tiny_model, tmp_path):
    sd = tiny_model.state_dict()
    save_file(sd, tmp_path / "base.safetensors")
    r = 4
    lora = {}
    expected = {k: v.clone() for k, v in sd.items()}
    for name, alpha in (("blocks.0.self_attn.q", 2.0), ("blocks.1.ffn.2", None)):
        w = sd[name + ".weight"]
        A, B = torch.randn(r, w.shape[1]), torch.randn(w.shape[0], r)
        lora[f"base_model.model.{name}.lora_A.default.weight"] = A
        lora[f"base_model.model.{name}.lora_B.default.weight"] = B
        if alpha is not None:
            lora[f"{name}.alpha"] = torch.tensor(alpha)
        expected[name + ".weight"] = w + ((alpha or 8.0) / r) * (B @ A)
    save_file(lora, tmp_path / "lora.safetensors")
    merged = load_model([tmp_path / "base.safetensors", tmp_path / "lora.safetensors"], config="tiny",
                        lora_alpha=8.0)
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-5)
    assert not torch.equal(merged.state_dict()["blocks.0.self_attn.q.weight"], sd["blocks.0.self_attn.q.weight"])
    with pytest.raises(CheckpointError, match="lora_alpha"):
        load_model([tmp_path / "base.safetensors", tmp_path / "lora.safetensors"], config="tiny")
    with pytest.raises(CheckpointError, match="base weight"):
        load_model(tmp_path / "lora.safetensors", config="tiny", lora_alpha=8.0)


def test_plain_wan_t2v_checkpoint_expands_and_zero_inits_audio(tiny_model, tmp_path):
    """A 16-channel Wan T2V state dict without audio modules: conditioning channels and audio contribute 0."""
    sd = {k: v for k, v in tiny_model.state_dict().items() if not k.startswith("audio_")}
    sd["patch_embedding.weight"] = sd["patch_embedding.weight"][:, :16].clone()
    save_file(sd, tmp_path / "wan_t2v.safetensors")
    model = load_model(tmp_path / "wan_t2v.safetensors", causal=False)  # config inferred (in_dim 65)
    assert model.config.in_dim == 65
    pe = model.state_dict()["patch_embedding.weight"]
    assert torch.equal(pe[:, :16], sd["patch_embedding.weight"]) and not pe[:, 16:].any()
    x, t, ctx, audio = make_inputs(model.config, frames=3)
    x2 = x.clone()
    x2[:, 16:] = torch.randn_like(x2[:, 16:])
    with torch.no_grad():
        base = model(x, t, ctx, None)
        torch.testing.assert_close(model(x2, t, ctx, audio), base, rtol=1e-6, atol=1e-6)
    # a partial set of audio keys is an error, not a silent zero-fill
    partial = dict(tiny_model.state_dict())
    del partial["audio_cond_projs.0.weight"]
    save_file(partial, tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match="audio_cond_projs.0.weight"):
        load_model(tmp_path / "partial.safetensors", config="tiny")


def test_cross_attn_checkpoint_infers_mode(tmp_path):
    cfg = ModelConfig.from_name("tiny", audio_injection="cross_attn", audio_window=3)
    model = build_model(cfg, causal=True)
    save_file(model.state_dict(), tmp_path / "x.safetensors")  # no metadata: infer from shapes
    loaded = load_model(tmp_path / "x.safetensors")
    assert loaded.config.audio_injection == "cross_attn" and loaded.config.audio_window == 3


# --- hardening (issue 13): configs from metadata checked against the tensors, bounded sizes, unreadable files,
# non-finite weights, degenerate LoRA ------------------------------------------------------------------------

def _with_metadata_config(tiny_model, path, **changes):
    cfg = {**tiny_model.config.to_dict(), **changes}
    save_file(dict(tiny_model.state_dict()), path, metadata={"lipforcing_config": json.dumps(cfg)})
    return path


@pytest.mark.parametrize("changes,match", [
    ({"num_layers": 200000}, r"num_layers = 200000 \(limit 1024\)"),
    ({"dim": 2 ** 40}, r"dim = 1099511627776 \(limit 32768\)"),
    ({"num_layers": 7}, r"num_layers 7, but the tensors hold 4 blocks"),
    ({"ffn_dim": 96}, r"ffn_dim 96, but blocks.0.ffn.0.weight has shape \(128, 64\)"),
    ({"dim": 128, "num_heads": 4}, r"dim 128, but patch_embedding.weight has shape \(64, 65, 1, 2, 2\)"),
    ({"num_heads": "two"}, r"model config in the checkpoint metadata .* is invalid"),
])
def test_metadata_config_is_bounded_and_checked_before_building(tiny_model, tmp_path, monkeypatch, changes, match):
    import lipforcing.model as model_pkg

    def no_build(*args, **kwargs):   # the check must come before any model is built
        raise AssertionError("build_model called for an invalid metadata config")

    monkeypatch.setattr(model_pkg, "build_model", no_build)
    path = _with_metadata_config(tiny_model, tmp_path / "meta.safetensors", **changes)
    with pytest.raises(CheckpointError, match=match):
        load_model(path)


def test_garbage_metadata_json_is_a_checkpoint_error(tiny_model, tmp_path):
    save_file(dict(tiny_model.state_dict()), tmp_path / "g.safetensors", metadata={"lipforcing_config": "{not json"})
    with pytest.raises(CheckpointError, match="lipforcing_config"):
        load_model(tmp_path / "g.safetensors")


def _assert_names_file(info, path):
    msg = str(info.value)
    assert str(path) in msg, msg
    assert "weights_only=False" not in msg and "weights_only` set to `False" not in msg, msg
    assert "\n" not in msg.strip(), msg


def test_unreadable_safetensors_name_the_file(tiny_model, tmp_path):
    good = tmp_path / "good.safetensors"
    save_file(dict(tiny_model.state_dict()), good)
    data = good.read_bytes()
    cases = {"truncated.safetensors": data[: len(data) // 2], "header_only.safetensors": data[:20],
             "empty.safetensors": b"", "garbage.safetensors": torch.randint(0, 256, (4000,),
                                                                            dtype=torch.uint8).numpy().tobytes()}
    for name, payload in cases.items():
        path = tmp_path / name
        path.write_bytes(payload)
        with pytest.raises(CheckpointError) as info:
            load_model(path, config="tiny")
        _assert_names_file(info, path)
        assert ("empty" if name.startswith("empty") else "not a readable safetensors file") in str(info.value)


def test_unreadable_pt_files_name_the_file_and_never_suggest_unsafe_loading(tiny_model, tmp_path):
    good = tmp_path / "good.pt"
    torch.save(dict(tiny_model.state_dict()), good)
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[:5000])
    (tmp_path / "garbage.pt").write_bytes(torch.randint(0, 256, (3000,), dtype=torch.uint8).numpy().tobytes())
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")   # a pickled nn.Module
    for name, match in (("truncated.pt", "not a readable torch file"), ("garbage.pt", "not a readable torch file"),
                        ("module.pt", "refusing to load")):
        with pytest.raises(CheckpointError, match=match) as info:
            load_model(tmp_path / name, config="tiny")
        _assert_names_file(info, tmp_path / name)


def test_fifo_is_refused_without_blocking(tmp_path):
    import os

    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match=r"pipe.safetensors is a FIFO"):
        load_model(fifo, config="tiny")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_naming_the_tensors(tiny_model, tmp_path, bad):
    sd = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    idx = tuple(int(torch.randint(0, n, ())) for n in sd["blocks.1.ffn.2.weight"].shape)
    sd["blocks.1.ffn.2.weight"][idx] = bad
    sd["head.modulation"].view(-1)[-1] = bad
    save_file(sd, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match=r"NaN or inf values in 2 tensor\(s\): blocks.1.ffn.2.weight, "
                                              r"head.modulation") as info:
        load_model(tmp_path / "nan.safetensors", config="tiny")
    _assert_names_file(info, tmp_path / "nan.safetensors")


def _lora_files(tiny_model, tmp_path, rank, alpha):
    sd = tiny_model.state_dict()
    save_file(dict(sd), tmp_path / "base.safetensors")
    w = sd["blocks.0.self_attn.q.weight"]
    lora = {"blocks.0.self_attn.q.lora_A.weight": torch.randn(rank, w.shape[1]),
            "blocks.0.self_attn.q.lora_B.weight": torch.randn(w.shape[0], rank)}
    if alpha is not None:
        lora["blocks.0.self_attn.q.alpha"] = torch.tensor(alpha)
    save_file(lora, tmp_path / "lora.safetensors")
    return [tmp_path / "base.safetensors", tmp_path / "lora.safetensors"]


def test_lora_rank_zero_is_refused(tiny_model, tmp_path):
    with pytest.raises(CheckpointError, match=r"(?s)LoRA rank 0 .*blocks.0.self_attn.q"):
        load_model(_lora_files(tiny_model, tmp_path, 0, 4.0), config="tiny")


@pytest.mark.parametrize("alpha", [float("nan"), float("inf")])
def test_lora_non_finite_alpha_is_refused(tiny_model, tmp_path, alpha):
    with pytest.raises(CheckpointError, match=r"NaN or inf values in 1 tensor\(s\): blocks.0.self_attn.q.alpha"):
        load_model(_lora_files(tiny_model, tmp_path, 3, alpha), config="tiny")
    from lipforcing.model.loading import merge_lora   # an in-memory state dict is checked by the merge itself

    w = torch.randn(6, 5)
    with pytest.raises(CheckpointError, match=r"LoRA alpha m.alpha is (nan|inf)"):
        merge_lora({"m.weight": w, "m.lora_A.weight": torch.randn(2, 5), "m.lora_B.weight": torch.randn(6, 2),
                    "m.alpha": torch.tensor(alpha)})
    with pytest.raises(ValueError, match=r"lora_alpha must be a finite number"):
        load_model(_lora_files(tiny_model, tmp_path, 3, None), config="tiny", lora_alpha=alpha)
