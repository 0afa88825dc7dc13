"""``lipforcing train`` input mistakes are one line and exit status 2 (issue 13), and checkpoints are written
atomically and refused when they cannot be resumed from."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import yaml

from lipforcing.cli import main

BASE = {"model": "tiny", "data": {"kind": "synthetic", "num_samples": 2, "frames": 3, "height": 4, "width": 4,
                                  "text_len": 4}, "iterations": 1, "device": "cpu"}


class Pickled:
    pass


def _run(tmp_path, capsys, stage="df", **cfg):
    d = {**BASE, "output_dir": str(tmp_path / "run"), **cfg}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(d))
    rc = main(["train", "--stage", stage, "--config", str(p)])
    return rc, capsys.readouterr().err


def _one_line_exit_2(rc, err, *needles):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("cfg, needle", [
    ({"lr": "abc"}, "lr"), ({"lr": -1}, "lr"), ({"model": "tinyy"}, "tinyy"),
    ({"model_overrides": {"dim": -1}}, "dim"), ({"dim": -1}, "dim"),
    ({"data": {"kind": "synthetic", "num_samples": 0}}, "num_samples"),
    ({"data": {"kind": "synthetic", "frames": 0}}, "frames"),
    ({"data": {"kind": "files", "path": "/nonexistent/latents"}}, "/nonexistent/latents"),
])
def test_bad_config_values_are_one_line_exit_2(tmp_path, capsys, cfg, needle):
    _one_line_exit_2(*_run(tmp_path, capsys, **cfg), needle)


@pytest.mark.parametrize("stage, cfg, needle", [
    ("vae", {"lr": "abc"}, "lr"), ("vae", {"frames": 0}, "frames"), ("vae", {"frames": 8}, "1 + 4"),
    ("syncnet", {"max_offset": 0}, "max_offset"), ("teacher", {"model": "tinyy"}, "tinyy"),
    ("teacher", {"text_dropout": 2}, "text_dropout"),
])
def test_bad_stage_configs_are_one_line_exit_2(tmp_path, capsys, stage, cfg, needle):
    d = {k: v for k, v in cfg.items()}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"), **d}))
    rc = main(["train", "--stage", stage, "--config", str(p)])
    _one_line_exit_2(rc, capsys.readouterr().err, needle)


@pytest.mark.parametrize("kind, needle", [("folder", "a folder, not a YAML file"), ("missing", "no such file")])
def test_config_that_is_not_a_file(tmp_path, capsys, kind, needle):
    target = tmp_path / "configs"
    if kind == "folder":
        target.mkdir()
    rc = main(["train", "--stage", "vae", "--config", str(target)])
    _one_line_exit_2(rc, capsys.readouterr().err, needle, str(target))


def test_student_init_pickled_object_is_refused(tmp_path, capsys):
    bad = tmp_path / "init.pt"
    with open(bad, "wb") as f:
        pickle.dump({"w": Pickled()}, f)
    _one_line_exit_2(*_run(tmp_path, capsys, student_init=str(bad)), str(bad))


def _trained(tmp_path, capsys) -> Path:
    rc, err = _run(tmp_path, capsys)
    assert rc == 0, err
    return tmp_path / "run" / "ckpt-000001"


def test_truncated_checkpoint_on_resume(tmp_path, capsys):
    ck = _trained(tmp_path, capsys)
    f = ck / "student.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _one_line_exit_2(*_run(tmp_path, capsys, iterations=2), "student.safetensors")


@pytest.mark.parametrize("text, needle", [("{not json", "not valid JSON"), ("[1, 2]", "JSON object"),
                                          ('{"iteration": -3, "stage": "df"}', "iteration"),
                                          ('{"iteration": "x", "stage": "df"}', "iteration")])
def test_garbage_trainer_json_on_resume(tmp_path, capsys, text, needle):
    ck = _trained(tmp_path, capsys)
    (ck / "trainer.json").write_text(text)
    _one_line_exit_2(*_run(tmp_path, capsys, iterations=2), "trainer.json", needle)


def test_nan_weights_refused_on_resume(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    ck = _trained(tmp_path, capsys)
    f = ck / "student.safetensors"
    sd = load_file(str(f))
    k = sorted(sd)[0]
    sd[k] = sd[k].clone().fill_(float("nan"))
    save_file(sd, str(f))
    _one_line_exit_2(*_run(tmp_path, capsys, iterations=2), "NaN", k)


def test_interrupted_save_keeps_the_previous_checkpoint_and_pointer(tmp_path, capsys, monkeypatch):
    """A crash while writing the second checkpoint's files leaves `latest` naming the first, complete one, and no
    half-written file under a final name."""
    import os

    from lipforcing.distill import checkpoint as ck

    _trained(tmp_path, capsys)
    run = tmp_path / "run"
    real = os.replace
    calls = {"n": 0}

    def flaky(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:       # the second file of the new checkpoint
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(ck.os, "replace", flaky)
    from lipforcing.distill.trainer import TrainConfig, Trainer

    cfg = TrainConfig.from_dict({**BASE, "stage": "df", "output_dir": str(run), "iterations": 2})
    tr = Trainer(cfg)
    with pytest.raises(KeyboardInterrupt):
        tr.train()
    monkeypatch.setattr(ck.os, "replace", real)
    assert (run / "latest").read_text() == "ckpt-000001"
    assert not list(run.rglob("*.tmp"))
    umask = os.umask(0)
    os.umask(umask)
    assert (run / "ckpt-000001" / "student.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    assert json.loads((run / "ckpt-000001" / "trainer.json").read_text())["iteration"] == 1
    again = Trainer(cfg)
    assert again.iteration == 1
    torch.testing.assert_close(again.student.state_dict(), tr.student.state_dict(), rtol=1, atol=1e9)
