"""Every stage of the recipe chained at tiny shapes, through the ``lipforcing`` command and the repo's configs:
vae -> data build -> teacher -> syncnet -> df -> sf (with the reward) -> eval; plus exact resume of the new
stages and the atomic checkpoint files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lipforcing.cli import main

REPO = Path(__file__).resolve().parents[2]
TINY_VAE = {"dim": 4, "z_dim": 16, "dim_mult": [1, 2, 2], "num_res_blocks": 1, "temporal_downsample": [True, True]}
SMALL = {  # per stage: the repo config, shrunk
    "vae": {"vae": TINY_VAE, "size": 32, "frames": 5, "stats_clips": 1, "speech": "synthetic"},
    "syncnet": {"frame_size": 16, "width": 4, "embed_dim": 8, "size": 32, "frames": 20, "windows": 2,
                "max_offset": 2, "batch_size": 1, "speech": "synthetic"},
    "teacher": {"batch_size": 1},
    "df": {"batch_size": 1},
    "sf": {"batch_size": 1, "critic_updates_per_student": 1},
}


def _config(tmp_path: Path, stage: str, **extra) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / f"{stage}.yaml").read_text())
    cfg.update(SMALL[stage], iterations=2, save_every=0, plot_every=0, output_dir=str(tmp_path / stage), **extra)
    p = tmp_path / f"{stage}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _train(tmp_path, stage, capsys, **extra):
    rc = main(["train", "--stage", stage, "--config", str(_config(tmp_path, stage, **extra)), "--threads", "1"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    run = tmp_path / stage
    assert (run / "latest").read_text() == "ckpt-000002"
    assert (run / "curves.png").stat().st_size > 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert all(torch.isfinite(torch.tensor([v for k, v in r.items() if "loss" in k])).all() for r in rows)
    assert not list(run.rglob("*.tmp")), "temporary files left behind"
    return run


def test_all_stages_chained(tmp_path, capsys):
    data = tmp_path / "data"
    vae = _train(tmp_path, "vae", capsys)
    assert (vae / "ckpt-000002" / "vae.safetensors").is_file()
    from lipforcing.distill.stages.vae import evaluate_vae, resolve_vae

    q = evaluate_vae(resolve_vae(vae), clips=1, frames=5, size=32, speech="synthetic", late_frames=8)
    assert 0 < q["mouth_psnr"] < 60 and 0 < q["psnr"] < 60 and 0 < q["late_psnr"] < 60
    assert -1.5 < q["mouth_contrast"] < 1.5
    assert main(["data", "build", "--vae", str(vae), "--out", str(data), "--clips", "2", "--frames", "9",
                 "--size", "32", "--speech", "synthetic"]) == 0
    capsys.readouterr()
    files = {"data": {"kind": "files", "path": str(data)}}
    teacher = _train(tmp_path, "teacher", capsys, **files)
    syncnet = _train(tmp_path, "syncnet", capsys)
    df = _train(tmp_path, "df", capsys, teacher_path=str(teacher), **files)
    _train(tmp_path, "sf", capsys, teacher_path=str(teacher), student_init=str(df), **files,
           reward={"enabled": True, "decoder": "vae", "vae_path": str(vae), "syncnet_path": str(syncnet),
                   "vshift": 2})
    rows = [json.loads(line) for line in (tmp_path / "sf" / "metrics.jsonl").read_text().splitlines()]
    assert "sync_confidence" in rows[0] and "dmd_loss" in rows[0]
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(tmp_path / "sf"), "--vae", str(vae), "--syncnet", str(syncnet),
                 "--teacher", str(teacher), "--teacher-steps", "2", "--teacher-cfg", "1", "4.5",
                 "--text", str(data / "meta" / "text.safetensors"), "--clips", "1", "--seconds", "2",
                 "--size", "32", "--speech", "synthetic", "-o", str(out)]) == 0
    assert "windows of 9 frames" in capsys.readouterr().out       # the teacher's training clips (data build)
    res = json.loads((out / "eval.json").read_text())
    assert list(res["rows"]) == ["ground_truth", "vae_roundtrip", "reference_copy", "teacher_cfg1.0", "teacher_cfg4.5",
                                 "model", "untrained"]
    assert res["rows"]["teacher_cfg4.5"]["fps"] > 0
    assert res["rows"]["ground_truth"]["sync_gt"] > 0.8
    assert "lse_c" in res["rows"]["model"] and res["rows"]["model"]["fps"] > 0
    assert (out / "strip.png").stat().st_size > 0 and "| ground_truth |" in (out / "eval.md").read_text()


@pytest.mark.parametrize("stage", ["vae", "syncnet", "teacher"])
def test_new_stages_resume_exactly(tmp_path, stage):
    """2 iterations + resume + 1 more == 3 iterations in one go (weights bit for bit)."""
    from lipforcing.distill.stages import stage_classes
    from lipforcing.distill.stages.base import config_from_yaml

    cfg_cls, run_cls = stage_classes(stage)

    extra = {"data": {"kind": "synthetic", "frames": 3, "height": 4, "width": 4}} if stage == "teacher" else {}

    def make(out, iterations):
        c = config_from_yaml(cfg_cls, _config(tmp_path, stage, **extra), output_dir=str(tmp_path / out),
                             iterations=iterations)
        return run_cls(c)

    a = make("a", 3)
    a.train()
    b = make("b", 2)
    b.train()
    b2 = make("b", 3)
    assert b2.iteration == 2
    b2.train()
    for name in a.models:
        sa, sb = a.models[name][0].state_dict(), b2.models[name][0].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), f"{stage}: resumed weights differ"


def test_resume_takes_lr_from_the_config(tmp_path):
    """A resume keeps the optimizer's moments but uses the lr of the config it runs with (the divergence message
    says to lower lr and resume; loading the optimizer state used to put the old lr back)."""
    from lipforcing.distill.stages import stage_classes
    from lipforcing.distill.stages.base import config_from_yaml

    cfg_cls, run_cls = stage_classes("syncnet")
    lr_a, lr_b = (float(v) for v in torch.empty(2).uniform_(1e-5, 1e-3))
    c = config_from_yaml(cfg_cls, _config(tmp_path, "syncnet"), output_dir=str(tmp_path / "r"), iterations=2, lr=lr_a)
    a = run_cls(c)
    a.train()
    moments = {k: v.clone() for k, v in a.models["syncnet"][1].state_dict()["state"][0].items()
               if isinstance(v, torch.Tensor)}
    c2 = config_from_yaml(cfg_cls, _config(tmp_path, "syncnet"), output_dir=str(tmp_path / "r"), iterations=3,
                          lr=lr_b)
    b = run_cls(c2)
    assert b.iteration == 2
    opt = b.models["syncnet"][1]
    assert all(g["lr"] == lr_b for g in opt.param_groups)
    assert all(torch.equal(opt.state_dict()["state"][0][k], v) for k, v in moments.items())


def test_vae_weight_average(tmp_path):
    """ema_decay d: after steps with weights w1, w2 (from w0) the average is d (d w0 + (1 - d) w1) + (1 - d) w2; the
    export is the average (statistics measured with it); a resume carries the average exactly, and a checkpoint
    without one starts it from the resumed weights."""
    import lipforcing
    from lipforcing.distill.stages.base import config_from_yaml
    from lipforcing.distill import checkpoint as ckpt
    from lipforcing.distill.stages.vae import VAEStage, VAEStageConfig, fold_latent_stats

    d = float(torch.empty(()).uniform_(0.5, 0.9))

    def run(out, iterations, **kw):
        c = config_from_yaml(VAEStageConfig, _config(tmp_path, "vae", **kw), output_dir=str(tmp_path / out),
                             iterations=iterations)
        st = VAEStage(c)
        st.train()
        return st

    w = [{k: v.clone() for k, v in run(f"raw{i}", i, ema_decay=0.0).vae.state_dict().items()} for i in range(3)]
    st = run("ema", 2, ema_decay=d)
    for k, v in st.ema.state_dict().items():
        if v.is_floating_point() and k in dict(st.vae.named_parameters()):
            want = d * (d * w[0][k] + (1 - d) * w[1][k]) + (1 - d) * w[2][k]
            torch.testing.assert_close(v, want, rtol=1e-5, atol=1e-6, msg=k)
    assert not all(torch.equal(v, w[2][k]) for k, v in st.ema.state_dict().items())
    ck = tmp_path / "ema" / "ckpt-000002"
    exported, _ = ckpt.load_tensors(ck / "vae.safetensors")
    mean, std = st.latent_stats()
    want = fold_latent_stats(st.ema.state_dict(), mean, std, st.vae.config)
    assert all(torch.equal(exported[k], want[k]) for k in want)
    # resume: 2 + 1 iterations == 3 in one go, average included
    one = run("one", 3, ema_decay=d)
    run("two", 2, ema_decay=d)
    two = run("two", 3, ema_decay=d)
    assert all(torch.equal(v, two.ema.state_dict()[k]) for k, v in one.ema.state_dict().items())
    # a checkpoint without an average (trained with ema_decay 0) starts it from its weights
    late = VAEStage(config_from_yaml(VAEStageConfig, _config(tmp_path, "vae", ema_decay=d),
                                     output_dir=str(tmp_path / "raw2"), iterations=2))
    assert all(torch.equal(v, w[2][k]) for k, v in late.ema.state_dict().items())


def test_exported_vae_carries_its_latent_statistics(tmp_path):
    """vae.safetensors = the trained VAE with the measured mean/std folded in: the stock loader (and the engine)
    normalise with them, and reconstructions are unchanged."""
    from safetensors import safe_open

    import lipforcing
    from lipforcing.distill.stages.base import config_from_yaml
    from lipforcing.distill.stages.vae import VAEStage, VAEStageConfig, world_video_batch

    st = VAEStage(config_from_yaml(VAEStageConfig, _config(tmp_path, "vae", ema_decay=0.0)))   # raw = exported
    st.train()
    f = tmp_path / "vae" / "ckpt-000002" / "vae.safetensors"
    with safe_open(str(f), "pt") as h:
        meta = h.metadata()
    mean, std = (torch.tensor(json.loads(meta[k])) for k in ("measured_latents_mean", "measured_latents_std"))
    video, _ = world_video_batch([int(torch.randint(0, 10_000, ()))], 5, 32, "synthetic")
    raw = st.vae.eval()
    exported = lipforcing.load_vae(str(f))
    mu = raw.encode(video, normalize=False)
    torch.testing.assert_close(exported.encode(video, normalize=True), (mu - mean.view(1, -1, 1, 1, 1))
                               / std.view(1, -1, 1, 1, 1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(exported.decode(exported.encode(video)), raw.decode(mu, normalize=False),
                               rtol=1e-4, atol=1e-4)
    eng = lipforcing.Engine.load(model="tiny", vae=str(f), resolution=32)   # random student, this VAE
    assert eng.vae.config.dim_mult == (1, 2, 2) and eng.vae.temporal_factor == 4
