"""The distillation trainer on the tiny preset: update ratio, loss reduction, checkpoint/resume, CLI, FSDP2."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lipforcing.distill.trainer import DF_ATTENTION_CONFIGS, TrainConfig, Trainer

DATA = {"num_samples": 4, "frames": 3, "height": 4, "width": 4, "text_len": 4}


def _cfg(tmp_path, stage, **kw):
    base = dict(stage=stage, output_dir=str(tmp_path / f"run_{stage}"), resume=False, data=DATA,
                attn_backend="reference", log_every=0)
    base.update(kw)
    return TrainConfig(**base)


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------ config
def test_config_yaml_roundtrip_and_errors(tmp_path):
    import yaml

    cfg = _cfg(tmp_path, "sf", reward={"enabled": True, "decoder": "latent_rgb"})
    # tiny-scale defaults (the paper's 2e-6 / 1e-5 are for 1.3B; tiny needs about 10x)
    assert cfg.student_lr == 2e-5 and cfg.student_betas == (0.0, 0.999)
    assert TrainConfig(stage="df").student_lr == 1e-4 and TrainConfig(stage="df").student_betas == (0.9, 0.999)
    assert TrainConfig(stage="sf", model="1.3b").student_lr == 2e-6
    assert TrainConfig(stage="df", model="1.3b").student_lr == 1e-5
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg.to_dict()))
    back = TrainConfig.from_yaml(p)
    assert back == cfg
    with pytest.raises(ValueError, match="unknown config fields"):
        TrainConfig.from_dict({"stage": "df", "learning_rate": 1})
    with pytest.raises(ValueError, match="unknown reward fields"):
        TrainConfig.from_dict({"reward": {"temperature": 1}})
    with pytest.raises(ValueError, match="stage"):
        TrainConfig(stage="kd")


def test_df_attention_configs_match_the_reference_window_semantics():
    """The reference's (local_attn_size incl. sink, sink) = (7, 1) is the inference attention (window 6 + sink 1):
    the first DF configuration must give exactly the student's default block-causal forward."""
    from lipforcing import ModelConfig, build_model

    assert DF_ATTENTION_CONFIGS == tuple((l - s, s) for l, s in ((7, 1), (10, 1), (13, 1), (9, 3), (12, 3)))
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny")
    s = build_model(cfg, causal=True)
    s.attn_backend = "reference"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_dim, 12, 4, 4, generator=g)
    ctx = torch.randn(1, 4, cfg.text_dim, generator=g)
    with torch.no_grad():
        ref = s(x, 500.0, ctx)
        assert torch.equal(s(x, 500.0, ctx, attention=DF_ATTENTION_CONFIGS[0]), ref)
        assert not torch.allclose(s(x, 500.0, ctx, attention=DF_ATTENTION_CONFIGS[1]), ref)


# ------------------------------------------------------------------------------------------------ schedule
def test_sf_critic_student_ratio_5_to_1(tmp_path):
    tr = Trainer(_cfg(tmp_path, "sf", iterations=10))
    hist = tr.train()
    student_its = [m["iteration"] for m in hist if "dmd_loss" in m]
    critic_its = [m["iteration"] for m in hist if "critic_loss" in m]
    assert student_its == [0, 5] and critic_its == list(range(10))
    # optimiser steps actually taken (AdamW's per-parameter step counters)
    p_s = next(iter(tr.student.parameters()))
    p_c = next(iter(tr.critic.parameters()))
    assert tr.student_opt.state[p_s]["step"].item() == 2
    assert tr.critic_opt.state[p_c]["step"].item() == 10
    g = tr.student_opt.param_groups[0]
    assert g["lr"] == 2e-5 and g["betas"] == (0.0, 0.999) and g["weight_decay"] == 0.01   # tiny default


# ------------------------------------------------------------------------------------------------ loss reduction
def test_df_iterations_reduce_the_loss(tmp_path):
    tr = Trainer(_cfg(tmp_path, "df", iterations=8, lr=2e-3, data={**DATA, "frames": 6}))

    def evaluate():   # the loss on the draws (batch, t, noise, window) of the 8 training iterations
        with torch.no_grad():
            return sum(tr.df_losses(k, tr.batch(k), attention=tr.df_attention(k)).mean().item() for k in range(8))

    before = evaluate()
    hist = tr.train()
    after = evaluate()
    assert any(m["df_loss"] > 0 for m in hist)   # a draw with every chunk at t = 0 has no loss
    assert after < 0.8 * before, (before, after)
    assert (Path(tr.cfg.output_dir) / "ckpt-000008" / "student.safetensors").is_file()


def test_sf_iterations_reduce_the_critic_loss_and_the_student_descends(tmp_path):
    from lipforcing.distill.data import batch_condition
    from lipforcing.distill.losses import dmd_gradient, predict_x0, sync_window_target, teacher_x0_pair

    tr = Trainer(_cfg(tmp_path, "sf", iterations=6, critic_lr=2e-3, lr=1e-5, critic_updates_per_student=100))
    batch = tr.batch(0)

    def critic_eval():
        with torch.no_grad():
            return tr.critic_losses(0, batch).mean().item()

    before = critic_eval()
    tr.train()
    after = critic_eval()
    assert after < before, (before, after)
    # one student update moves the rollout output along -DMD gradient (to first order)
    x0, cond = batch_condition(batch, tr.device)
    k = 0
    with torch.no_grad():
        gen0, _ = tr.rollout(k, cond, x0.shape, "student", grad=False)
        t, eps = tr._dmd_noise(k, "dmd", x0.shape)
        x_t = (1 - t.view(-1, 1, 1, 1, 1)) * gen0 + t.view(-1, 1, 1, 1, 1) * eps
        c_x0 = predict_x0(tr.critic, x_t, t, cond)
        teach = sync_window_target(*teacher_x0_pair(tr.teacher, x_t, t, cond), t)
        grad = dmd_gradient(gen0, c_x0, teach)
    assert grad.abs().mean() > 0
    m = tr.student_update(k, batch)
    assert m["dmd_loss"] > 0 and m["student_grad_norm"] > 0
    with torch.no_grad():
        gen1, _ = tr.rollout(k, cond, x0.shape, "student", grad=False)
    assert ((gen1 - gen0) * grad).sum().item() < 0


def test_sf_reward_weights_the_per_sample_losses(tmp_path):
    calls = []

    def reward(latents, waveform):
        calls.append((latents.requires_grad, tuple(waveform.shape)))
        w = torch.full((latents.shape[0],), 3.0)
        return w, torch.zeros(latents.shape[0])

    tr = Trainer(_cfg(tmp_path, "sf", iterations=1, batch_size=2), reward=reward)
    m = tr.train()[0]
    assert calls and calls[0][1][0] == 2
    assert m["reward_weight_mean"] == 3.0
    assert m["student_loss"] == pytest.approx(3.0 * m["dmd_loss"], rel=1e-5)


def test_sf_reward_from_config_uses_syncnet_confidence(tmp_path):
    """reward.enabled builds decoder + SyncNet (random weights here) and logs LSE-C and exp(2 LSE-C)."""
    tr = Trainer(_cfg(tmp_path, "sf", iterations=1, reward={"enabled": True, "decoder": "latent_rgb", "vshift": 2}))
    m = tr.train()[0]
    assert m["reward_weight_mean"] == pytest.approx(math.exp(2 * m["sync_confidence"]), rel=1e-5)
    assert m["student_loss"] == pytest.approx(m["reward_weight_mean"] * m["dmd_loss"], rel=1e-5)


@pytest.mark.parametrize("stage", ["df", "sf"])
def test_bf16_autocast_runs(tmp_path, stage):
    tr = Trainer(_cfg(tmp_path, stage, iterations=2, precision="bf16", critic_updates_per_student=1))
    hist = tr.train()
    assert all(math.isfinite(v) for m in hist for k, v in m.items() if k.endswith("loss"))
    assert next(iter(tr.student.parameters())).dtype == torch.float32      # fp32 master weights


# ------------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("stage", ["df", "sf"])
def test_checkpoint_resume_reproduces_the_run(tmp_path, stage):
    kw = dict(lr=1e-3, critic_lr=1e-3, critic_updates_per_student=2, batch_size=2)
    a = Trainer(_cfg(tmp_path / "a", stage, iterations=4, **kw))
    a.train()
    b = Trainer(_cfg(tmp_path / "b", stage, iterations=2, **kw))
    b.train()
    assert (Path(b.cfg.output_dir) / "latest").read_text() == "ckpt-000002"
    c = Trainer(_cfg(tmp_path / "b", stage, iterations=4, resume=True, **kw))
    assert c.iteration == 2
    for name in ("student", "critic") if stage == "sf" else ("student",):
        assert all(torch.equal(v, _params(getattr(b, name))[k]) for k, v in _params(getattr(c, name)).items())
    hist = c.train()
    assert [m["iteration"] for m in hist] == [2, 3]
    for name in ("student", "critic") if stage == "sf" else ("student",):
        pa, pc = _params(getattr(a, name)), _params(getattr(c, name))
        for k in pa:
            torch.testing.assert_close(pc[k], pa[k], rtol=0, atol=0, msg=f"{name}.{k}")
    # the student checkpoint is a regular model file (Wan-native names + config metadata)
    from lipforcing import load_model

    ck = Path(c.cfg.output_dir) / "ckpt-000004" / "student.safetensors"
    loaded = load_model(ck, causal=True)
    assert loaded.config == c.student.config
    for k, v in _params(loaded).items():
        assert torch.equal(v, _params(c.student)[k])


def test_resume_takes_lr_from_the_config(tmp_path):
    """A resume keeps the optimizers' moments but runs with the lr of its own config (student and critic)."""
    lr_a, lr_b, clr_b = (float(v) for v in torch.empty(3).uniform_(1e-5, 1e-3))
    a = Trainer(_cfg(tmp_path, "sf", iterations=1, lr=lr_a, critic_lr=lr_a, critic_updates_per_student=1))
    a.train()
    b = Trainer(_cfg(tmp_path, "sf", iterations=2, resume=True, lr=lr_b, critic_lr=clr_b,
                     critic_updates_per_student=1))
    assert b.iteration == 1
    assert [g["lr"] for g in b.student_opt.param_groups] == [lr_b] * len(b.student_opt.param_groups)
    assert [g["lr"] for g in b.critic_opt.param_groups] == [clr_b] * len(b.critic_opt.param_groups)
    sa, sb = a.student_opt.state_dict()["state"], b.student_opt.state_dict()["state"]
    assert sb and all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)


# ------------------------------------------------------------------------------------------------ CLI
def _df_yaml(tmp_path, iterations, output_dir):
    import yaml

    cfg = tmp_path / "df.yaml"
    cfg.write_text(yaml.safe_dump({"iterations": iterations, "output_dir": str(output_dir), "data": DATA,
                                   "attn_backend": "reference"}))
    return cfg


def test_cli_train_command(tmp_path, capsys):
    from lipforcing import cli

    cfg = _df_yaml(tmp_path, 2, tmp_path / "out")
    assert cli.main(["train", "--stage", "df", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "iterations 0 -> 2" in out and "df_loss" in out
    assert (tmp_path / "out" / "ckpt-000002" / "student.safetensors").is_file()
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "df_loss" in json.loads(lines[0])
    # resumes: nothing left to do
    assert cli.main(["train", "--stage", "df", "--config", str(cfg), "--iterations", "2"]) == 0
    assert "iterations 2 -> 2" in capsys.readouterr().out
    assert cli.main(["train", "--stage", "df", "--config", str(tmp_path / "missing.yaml")]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr_typo: 1\n")
    assert cli.main(["train", "--stage", "df", "--config", str(bad)]) == 2
    assert "lr_typo" in capsys.readouterr().err


@pytest.mark.parametrize("text, expected", [("iterations: [1\n", "not valid YAML"),
                                            ("device: gpu\n", "device must be"),
                                            ("device: cuda:x\n", "device must be")])
def test_cli_train_bad_config_is_one_line(tmp_path, capsys, text, expected):
    from lipforcing import cli

    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    assert cli.main(["train", "--stage", "df", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_train_unusable_output_dir_fails_before_training(tmp_path, capsys):
    from lipforcing import cli

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cfg = _df_yaml(tmp_path, 1, blocker / "out")
    assert cli.main(["train", "--stage", "df", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "output_dir" in err and "cannot create" in err


def test_init_distributed_gives_cuda_an_index(monkeypatch):
    # torch.cuda.set_device rejects a cuda device without an index; "cuda" must become the current device.
    from lipforcing.distill import trainer

    seen = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.append(d))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert trainer.init_distributed("cuda") == torch.device("cuda", 0)
    assert trainer.init_distributed("cuda:1") == torch.device("cuda", 1)
    assert seen == [torch.device("cuda", 0), torch.device("cuda", 1)]


# ------------------------------------------------------------------------------------------------ FSDP2
@pytest.mark.slow
def test_fsdp2_two_process_run_matches_single_process(tmp_path):
    """torchrun --nproc_per_node 2 (gloo, CPU), FSDP2 with per-block units, global batch 2 = 2 ranks x 1, versus
    one process with batch 2: both stages give the same weights after 3 iterations (lr 1e-3)."""
    worker = Path(__file__).with_name("_fsdp_worker.py")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
           "--stage", "both", "--out", str(tmp_path / "fsdp"), "--batch-size", "1"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    sys.path.insert(0, str(worker.parent))
    try:
        import _fsdp_worker
    finally:
        sys.path.pop(0)
    assert _fsdp_worker.main(["--stage", "both", "--out", str(tmp_path / "single"), "--batch-size", "2",
                              "--fsdp", "off"]) == 0
    from safetensors.torch import load_file

    for stage, names in (("df", ("student",)), ("sf", ("student", "critic"))):
        for name in names:
            a = load_file(str(tmp_path / "fsdp" / stage / f"{name}.safetensors"))
            b = load_file(str(tmp_path / "single" / stage / f"{name}.safetensors"))
            assert a.keys() == b.keys()
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=5e-5, msg=f"{stage} {name}.{k}")
        ha = json.loads((tmp_path / "fsdp" / stage / "history.json").read_text())
        hb = json.loads((tmp_path / "single" / stage / "history.json").read_text())
        for ma, mb in zip(ha, hb):
            for key in ("df_loss", "dmd_loss", "critic_loss", "student_grad_norm"):
                if key in mb:
                    assert ma[key] == pytest.approx(mb[key], rel=1e-4, abs=1e-6), (stage, key)


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_trainer_on_gpu(tmp_path, precision):
    """Both stages on one GPU with the default ("auto") attention backends, fp32 and bf16 autocast."""
    for stage in ("df", "sf"):
        tr = Trainer(TrainConfig(stage=stage, iterations=2, output_dir=str(tmp_path / stage), resume=False,
                                 device="cuda", precision=precision, critic_updates_per_student=1, log_every=0,
                                 data={"num_samples": 2, "frames": 6, "height": 8, "width": 8, "text_len": 4}))
        assert tr.device.type == "cuda"
        hist = tr.train()
        assert all(math.isfinite(v) for m in hist for k, v in m.items() if k.endswith("loss"))


def test_sf_matches_the_authors_training_details(tmp_path, monkeypatch):
    """Shifted DMD / critic timesteps are clamped to <= 0.999, and the training rollout starts from 0.999 * eps
    (the same draws as without the scale, times 0.999)."""
    from lipforcing import schedule
    from lipforcing.distill import rollout

    tr = Trainer(_cfg(tmp_path, "sf"))
    k = int(torch.randint(0, 1000, ()))
    shape = (tr.cfg.batch_size, 16, 3, 4, 4)
    monkeypatch.setattr(schedule, "sample_dmd_timesteps", lambda n, generator=None: torch.full((n,), 0.9998))
    t, _ = tr._dmd_noise(k, "dmd", shape)
    assert float(t.max()) == pytest.approx(0.999)
    seen = {}

    def fake_rollout(student, noise, cond, **kw):
        seen["noise"] = noise
        return noise, {"exit_step": 0}

    monkeypatch.setattr(rollout, "self_forcing_rollout", fake_rollout)
    tr.rollout(k, None, shape, "student", grad=False)
    eps = torch.stack([torch.randn(shape[1:], generator=g) for g in tr.sample_gens(k, "student/noise")])
    torch.testing.assert_close(seen["noise"], 0.999 * eps)
