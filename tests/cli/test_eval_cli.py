"""``lipforcing eval`` from the command line: several named students, the teacher rows, the VAE round trip, and
bad inputs as one-line errors naming the flag."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from lipforcing.cli import UserError, main
from lipforcing.cli.eval import parse_cfgs, parse_checkpoints, teacher_window


def test_checkpoint_names(tmp_path):
    assert parse_checkpoints(["runs/sf"]) == {"model": "runs/sf"}
    assert parse_checkpoints(["df=runs/df", "sw_dmd=runs/sf", "sw_dmd+reward=runs/sf2"]) == {
        "df": "runs/df", "sw_dmd": "runs/sf", "sw_dmd+reward": "runs/sf2"}
    odd = tmp_path / "a=b.safetensors"          # an existing path with '=' in it is a plain path
    odd.write_bytes(b"")
    assert parse_checkpoints([str(odd)]) == {"model": str(odd)}
    for bad, msg in ((["df=a", "df=b"], "two checkpoints named 'df'"), (["a", "b"], "two checkpoints named 'model'"),
                     (["untrained=a"], "reserved"), (["teacher_x=a"], "reserved"), (["vae_roundtrip=a"], "reserved"),
                     (["=a"], "NAME=PATH"), (["df="], "NAME=PATH")):
        with pytest.raises(UserError, match="--checkpoint") as e:
            parse_checkpoints(bad)
        assert msg in str(e.value)


def test_cfg_values():
    assert parse_cfgs(["1.0", "4.5", "7"]) == [1.0, 4.5, 7.0]
    for bad in (["abc"], ["1.0", "1"], ["nan"], ["inf"]):
        with pytest.raises(UserError, match="--teacher-cfg"):
            parse_cfgs(bad)


def test_bad_inputs_name_the_flag(tmp_path, capsys):
    base = ["eval", "--vae", "tiny", "-o", str(tmp_path / "out"), "--clips", "1", "--seconds", "2", "--size", "32"]
    missing = str(tmp_path / "missing.safetensors")
    for extra, flag in ((["--checkpoint", missing], "--checkpoint"), (["--teacher", missing], "--teacher"),
                        (["--teacher", missing, "--teacher-cfg", "1.0", "x"], "--teacher-cfg"),
                        (["--teacher-steps", "0"], "--teacher-steps"), (["--teacher-steps", "two"], "--teacher-steps"),
                        (["--checkpoint", "a=x", "--checkpoint", "a=y"], "--checkpoint")):
        with pytest.raises(UserError, match=flag):
            main(["--debug", *base, *extra])
        assert main([*base, *extra]) == 2                      # without --debug: one line, exit 2
        assert flag in capsys.readouterr().err
    (tmp_path / "t.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="--teacher-window"):
        main(["--debug", *base, "--teacher", str(tmp_path / "t.safetensors"), "--teacher-window", "20"])


def test_teacher_window_from_its_training_data(tmp_path):
    data = tmp_path / "data"
    (data / "meta").mkdir(parents=True)
    (data / "meta" / "dataset.json").write_text(json.dumps({"frames": 13}))
    ck = tmp_path / "teacher" / "ckpt-000010"
    ck.mkdir(parents=True)
    (ck / "teacher.safetensors").write_bytes(b"")
    (tmp_path / "teacher" / "latest").write_text("ckpt-000010")
    (ck / "trainer.json").write_text(json.dumps({"iteration": 10, "stage": "teacher",
                                                 "config": {"data": {"kind": "files", "path": str(data)}}}))
    assert teacher_window(str(tmp_path / "teacher")) == 13
    assert teacher_window(str(ck / "teacher.safetensors")) == 13
    assert teacher_window(str(tmp_path / "teacher"), "9") == 9
    (ck / "trainer.json").write_text(json.dumps({"config": {"data": {"kind": "synthetic", "frames": 4}}}))
    assert teacher_window(str(ck)) == 13
    (ck / "trainer.json").write_text("{")
    assert teacher_window(str(ck)) == 21                      # unknown: the data builder's default


def test_eval_builds_teacher_rows_and_named_students(tmp_path, capsys, monkeypatch):
    """The command hands evaluate() one TeacherSystem per CFG scale, one engine per named student, the untrained
    control and the VAE; the report it writes keeps the row order.  (evaluate() itself: tests/eval; the whole
    command with a trained teacher and student: tests/distill/test_stages.py::test_all_stages_chained.)"""
    import lipforcing
    from lipforcing.eval import runner
    from lipforcing.eval.teacher import TeacherSystem
    from lipforcing.model import build_model
    from lipforcing.model.loading import save_model

    seed = int(np.random.default_rng().integers(0, 10_000))
    torch.manual_seed(seed)
    save_model(build_model("tiny", causal=False), tmp_path / "teacher.safetensors")
    for name in ("df", "sf"):
        save_model(build_model("tiny", causal=True), tmp_path / f"{name}.safetensors")
    seen = {}

    def fake_evaluate(engines, cfg, *, syncnet=None, strip_path=None, vae=None):
        seen.update(engines=engines, cfg=cfg, vae=vae)
        names = ["ground_truth", "vae_roundtrip", "reference_copy", *engines]
        return {"config": dataclasses.asdict(cfg), "rows": {n: {"sync": 0.1} for n in runner.row_order(names)}}

    monkeypatch.setattr(runner, "evaluate", fake_evaluate)
    out = tmp_path / "out"
    assert main(["eval", "--vae", "tiny", "--teacher", str(tmp_path / "teacher.safetensors"), "--teacher-steps", "3",
                 "--teacher-cfg", "1.0", "4.5", "--teacher-window", "13",
                 "--checkpoint", f"df={tmp_path / 'df.safetensors'}",
                 "--checkpoint", f"sf={tmp_path / 'sf.safetensors'}",
                 "--clips", "1", "--seconds", "2", "--size", "32", "--seed", str(seed % 100), "-o", str(out)]) == 0
    eng = seen["engines"]
    assert list(eng) == ["teacher_cfg1.0", "teacher_cfg4.5", "df", "sf", "untrained"]
    for name, g in (("teacher_cfg1.0", 1.0), ("teacher_cfg4.5", 4.5)):
        t = eng[name]
        assert isinstance(t, TeacherSystem) and (t.guidance, t.steps, t.window, t.seed) == (g, 3, 13, seed % 100)
        assert t.model.causal is False
        assert t.vae is seen["vae"] is not None
    assert eng["teacher_cfg1.0"].model is eng["teacher_cfg4.5"].model
    assert eng["teacher_cfg1.0"].cache is eng["teacher_cfg4.5"].cache is not None
    for name in ("df", "sf", "untrained"):
        assert isinstance(eng[name], lipforcing.Engine) and eng[name].vae is seen["vae"]
    from safetensors.torch import load_file

    sd = load_file(tmp_path / "sf.safetensors")
    k = next(iter(sd))
    assert torch.equal(eng["sf"].model.state_dict()[k].float(), sd[k].float())
    table = [ln.split("|")[1].strip() for ln in (out / "eval.md").read_text().splitlines()
             if ln.startswith("| ") and "system" not in ln]
    assert table == ["ground_truth", "vae_roundtrip", "reference_copy", "teacher_cfg1.0", "teacher_cfg4.5", "df",
                     "sf", "untrained"]
    assert "windows of 13 frames" in capsys.readouterr().out
