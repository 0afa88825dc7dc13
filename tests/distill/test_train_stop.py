"""Stopping a training run early loses nothing: ``--max-minutes`` and SIGTERM / SIGINT stop the loop after the
iteration in progress with a checkpoint that resumes to the uninterrupted result; the VAE stage's worker pool renders
the same batches as inline rendering."""
from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from lipforcing.distill.stages import base
from lipforcing.distill.stages.base import Stage, StageConfig, StopRequest, stop_on_signals

REPO = Path(__file__).resolve().parents[2]


class _Toy(Stage):
    """A linear regression whose data of iteration k is a function of (seed, k)."""

    name = "toy"

    def build(self):
        self.net = torch.nn.Linear(5, 3)
        self.models = {"net": (self.net, self.optimizer(self.net))}

    def step(self, k):
        g = self.generator(k, "data")
        x, y = torch.randn(4, 5, generator=g), torch.randn(4, 3, generator=g)
        loss = (self.net(x) - y).pow(2).mean()
        self.clip_and_step("net", loss)
        return {"loss": loss.item()}


def _toy(out, iterations, **kw):
    return _Toy(StageConfig(stage="toy", iterations=iterations, output_dir=str(out), lr=1e-2, **kw))


class _Clock:
    """A wall clock that advances one second per reading."""

    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        self.t += 1.0
        return self.t


def test_max_minutes_stops_after_the_iteration_and_resumes_to_the_same_result(tmp_path, monkeypatch):
    total = int(torch.randint(6, 10, ()))
    whole = _toy(tmp_path / "whole", total)
    whole.train()
    assert whole.stopped is None

    monkeypatch.setattr(base, "_clock", _Clock())
    stop = StopRequest(3.5 / 60)                        # made at t = 1001; checks at 1002, 1003, 1004, 1005 >= 1004.5
    a = _toy(tmp_path / "cut", total, save_every=100)
    ran = a.train(stop=stop)
    assert len(ran) == 3 and a.iteration == 3 and "max_minutes" in a.stopped
    assert (tmp_path / "cut" / "latest").read_text() == "ckpt-000003"      # saved although save_every is 100

    b = _toy(tmp_path / "cut", total)                   # resumes from the checkpoint the stop left
    assert b.iteration == 3
    b.train()
    sw, sb = whole.net.state_dict(), b.net.state_dict()
    assert all(torch.equal(sw[k], sb[k]) for k in sw), "the stopped + resumed run differs from the uninterrupted one"


def test_a_stop_requested_before_the_loop_runs_nothing(tmp_path):
    stop = StopRequest()
    stop.request("test")
    a = _toy(tmp_path / "a", 5)
    assert a.train(stop=stop) == [] and a.stopped == "test" and a.iteration == 0
    assert not (tmp_path / "a" / "latest").exists()
    with pytest.raises(Exception, match="max_minutes"):
        StopRequest(0)


def test_the_student_trainer_stops_and_saves(tmp_path, monkeypatch):
    from lipforcing.distill.trainer import TrainConfig, Trainer

    cfg = TrainConfig(stage="df", model="tiny", iterations=50, batch_size=1, device="cpu", output_dir=str(tmp_path),
                      data={"kind": "synthetic", "num_samples": 2, "frames": 3, "height": 4, "width": 4})
    monkeypatch.setattr(base, "_clock", _Clock())
    t = Trainer(cfg)
    ran = t.train(stop=StopRequest(2.5 / 60))          # made at 1001: iterations at 1002, 1003; stop at 1004
    assert len(ran) == 2 and t.stopped and (tmp_path / "latest").read_text() == "ckpt-000002"


def test_signal_handler_is_installed_in_the_main_thread_only_and_restored():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    stop = StopRequest()
    with stop_on_signals(stop):
        h = signal.getsignal(signal.SIGTERM)
        assert h is signal.getsignal(signal.SIGINT) and h not in before
        h(signal.SIGTERM, None)
        h(signal.SIGTERM, None)                          # a second SIGTERM: still stopping after the iteration
        assert stop.reason() == "SIGTERM"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before

    stop2 = StopRequest()
    with stop_on_signals(stop2):
        h = signal.getsignal(signal.SIGINT)
        h(signal.SIGINT, None)
        assert stop2.reason() == "SIGINT"
        with pytest.raises(KeyboardInterrupt):           # a second Ctrl-C aborts at once
            h(signal.SIGINT, None)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before

    seen = []

    def other_thread():
        with stop_on_signals(StopRequest()):
            seen.append(signal.getsignal(signal.SIGTERM))

    th = threading.Thread(target=other_thread)
    th.start()
    th.join()
    assert seen == [before[0]]


def test_sigterm_from_a_thread_mid_run_stops_with_a_checkpoint(tmp_path, capsys):
    """``lipforcing train`` (a tiny SyncNet stage) gets SIGTERM while it trains: it finishes the iteration, saves,
    prints one line saying where, exits 0, and the run resumes from there."""
    from lipforcing.cli import main

    cfg = yaml.safe_load((REPO / "configs" / "syncnet.yaml").read_text())
    cfg.update(frame_size=16, width=4, embed_dim=8, size=32, frames=20, windows=2, max_offset=2, batch_size=1,
               speech="synthetic", iterations=100_000, save_every=0, plot_every=0, output_dir=str(tmp_path / "run"))
    conf = tmp_path / "syncnet.yaml"
    conf.write_text(yaml.safe_dump(cfg))
    metrics = tmp_path / "run" / "metrics.jsonl"
    done, sent = threading.Event(), []

    def killer():
        while not done.is_set():
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
                if not done.is_set():
                    sent.append(True)
                    signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
                return
            time.sleep(0.01)

    stray = []
    outer = signal.signal(signal.SIGTERM, lambda *a: stray.append(a))   # a late signal must not end pytest
    th = threading.Thread(target=killer)
    try:
        th.start()
        rc = main(["train", "--stage", "syncnet", "--config", str(conf), "--threads", "1"])
    finally:
        done.set()
        th.join()
        signal.signal(signal.SIGTERM, outer)
    out = capsys.readouterr().out.strip().splitlines()
    assert sent and not stray and rc == 0
    n = len(metrics.read_text().splitlines())
    ck = f"ckpt-{n:06d}"
    assert 2 <= n < 100_000 and (tmp_path / "run" / "latest").read_text() == ck
    assert out[-1].startswith("lipforcing train syncnet: stopped (SIGTERM)") and out[-1].endswith(
        str(tmp_path / "run" / ck)), out
    assert json.loads((tmp_path / "run" / ck / "trainer.json").read_text())["iteration"] == n
    assert main(["train", "--stage", "syncnet", "--config", str(conf), "--threads", "1",
                 "--iterations", str(n + 1)]) == 0
    assert "iterations %d -> %d" % (n, n + 1) in capsys.readouterr().out


def test_max_minutes_flag(tmp_path, capsys, monkeypatch):
    from lipforcing.cli import main

    cfg = yaml.safe_load((REPO / "configs" / "syncnet.yaml").read_text())
    cfg.update(frame_size=16, width=4, embed_dim=8, size=32, frames=20, windows=2, max_offset=2, batch_size=1,
               speech="synthetic", iterations=1000, save_every=0, plot_every=0, output_dir=str(tmp_path / "run"))
    conf = tmp_path / "syncnet.yaml"
    conf.write_text(yaml.safe_dump(cfg))
    assert main(["train", "--stage", "syncnet", "--config", str(conf), "--max-minutes", "-1"]) == 2
    assert "--max-minutes" in capsys.readouterr().err
    monkeypatch.setattr(base, "_clock", _Clock())
    assert main(["train", "--stage", "syncnet", "--config", str(conf), "--threads", "1", "--max-minutes",
                 str(1.5 / 60)]) == 0                    # made at 1001; one iteration at 1002; stop at 1003
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("lipforcing train syncnet: stopped (max_minutes") and "iterations 0 -> 1" in line
    assert (tmp_path / "run" / "latest").read_text() == "ckpt-000001"


def test_vae_worker_pool_renders_the_same_batches_and_run(tmp_path):
    """workers > 0: the spawned pool (and its one-ahead prefetch) gives bit-identical batches, hence the same
    trained weights; the pool is gone when train returns."""
    import lipforcing.distill.stages.vae as vs

    seed = int(torch.randint(0, 1000, ()))

    def make(out, workers):
        return vs.VAEStage(vs.VAEStageConfig(
            size=32, frames=5, warmup_frames=8, iterations=3, batch_size=2, workers=workers, stats_clips=1,
            speech="synthetic", output_dir=str(tmp_path / out), seed=seed,
            vae={"dim": 4, "z_dim": 16, "dim_mult": [1, 2, 2], "num_res_blocks": 1,
                 "temporal_downsample": [True, True]}))

    pooled = make("pooled", 1)
    try:
        for k in (7, 8, 3):                          # 8: the prefetched render of 7's call; 3: a fresh map
            seeds, frames = pooled.clip_jobs(k)
            want = vs.world_video_batch(seeds, frames, 32, "synthetic")
            got = pooled.batch(k)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), k
        assert pooled._ahead[0] == 4
    finally:
        pooled.close()
    assert pooled._workers is None
    inline = make("inline", 0)
    pooled = make("pooled", 1)
    inline.train()
    pooled.train()
    assert pooled._workers is None
    si, sp = inline.vae.state_dict(), pooled.vae.state_dict()
    assert all(torch.equal(si[k], sp[k]) for k in si)
