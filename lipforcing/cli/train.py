"""``lipforcing train --stage NAME --config run.yaml``: every stage of the recipe from a YAML config.

Stages come from :data:`lipforcing.distill.stages.STAGES` (vae, syncnet, teacher, df, sf, and any registered
later); ``configs/<stage>.yaml`` in the repository are working examples.  Mistakes in the config or in the files it
names are one line and exit status 2 (the trainer raises ``TrainConfigError``).

Stopping early loses nothing: with ``--max-minutes M`` the loop stops after the iteration in progress once M minutes
have passed since the command started (model building and resuming count), and SIGTERM / SIGINT do the same at any
time (a second Ctrl-C aborts at once); the run saves a checkpoint, prints one line saying where and exits 0.  A
runner whose ``train`` takes no ``stop`` (a registered stage not built on ``Stage``) keeps the old behaviour.
"""
from __future__ import annotations

import inspect
import logging
from pathlib import Path

from lipforcing.cli import UserError

HELP = "train a stage of the recipe: vae, syncnet, teacher, df (diffusion forcing) or sf (Self-Forcing DMD)"


def add_args(p) -> None:
    from lipforcing.distill.stages import STAGES

    p.add_argument("--stage", required=True, choices=list(STAGES),
                   help="; ".join(f"{k}: {v[3]}" for k, v in STAGES.items()))
    p.add_argument("--config", required=True, help="YAML file with the stage's config fields (see configs/)")
    p.add_argument("--output-dir", default=None, help="override output_dir")
    p.add_argument("--iterations", type=int, default=None, help="override iterations")
    p.add_argument("--device", default=None, help="override device (auto, cpu, cuda)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-resume", action="store_true", help="start fresh even if output_dir has a checkpoint")
    p.add_argument("--max-minutes", type=float, default=None, metavar="M",
                   help="stop after the iteration in progress once M minutes of wall time have passed since the "
                        "command started, and save a checkpoint (SIGTERM / SIGINT stop the same way)")


def run(args) -> int:
    from lipforcing.distill.errors import TrainConfigError
    from lipforcing.distill.stages.base import StopRequest, stop_on_signals

    try:
        stop = StopRequest(args.max_minutes)               # the budget counts from here
    except TrainConfigError as exc:
        raise UserError(f"--max-minutes: {exc}") from None
    with stop_on_signals(stop):
        return _run(args, stop)


def _run(args, stop) -> int:
    import torch
    import yaml

    from lipforcing.distill.stages import stage_classes
    from lipforcing.distill.stages.base import config_from_yaml

    path = Path(args.config)
    if not path.is_file():
        what = ("a folder, not a YAML file (e.g. configs/vae.yaml)" if path.is_dir() else
                "not a regular file" if path.exists() else "no such file")
        raise UserError(f"--config {args.config!r}: {what}")
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    overrides = {"stage": args.stage, "output_dir": args.output_dir, "iterations": args.iterations,
                 "device": args.device}
    if args.no_resume:
        overrides["resume"] = False
    config_cls, runner_cls = stage_classes(args.stage)
    try:
        if hasattr(config_cls, "from_yaml"):
            cfg = config_cls.from_yaml(path, **overrides)
        else:
            cfg = config_from_yaml(config_cls, path, **overrides)
    except yaml.YAMLError as exc:
        raise UserError(f"{args.config}: not valid YAML ({' '.join(str(exc).split())})") from None
    except (ValueError, TypeError) as exc:
        raise UserError(f"{args.config}: {exc}") from None
    try:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"output_dir {cfg.output_dir!r}: cannot create it ({exc.strerror}); pass --output-dir") \
            from None
    logging.getLogger("lipforcing").setLevel(logging.INFO)
    trainer = runner_cls(cfg)
    start = trainer.iteration
    takes_stop = "stop" in inspect.signature(trainer.train).parameters
    ran = trainer.train(stop=stop) if takes_stop else trainer.train()
    if trainer.rank == 0:
        last = ran[-1] if ran else {}
        keys = [k for k in last if k.endswith("loss") or k.endswith("psnr")]
        summary = f"iterations {start} -> {trainer.iteration}" + (
            "; last " + ", ".join(f"{k} {last[k]:.4g}" for k in keys) if keys else "")
        why = getattr(trainer, "stopped", None)
        if why:     # one line: why it stopped and where the checkpoint is
            latest = Path(cfg.output_dir) / "latest"
            where = "no checkpoint"
            if latest.is_file():
                where = f"checkpoint {Path(cfg.output_dir) / latest.read_text().strip()}"
                where += "" if ran else " (unchanged)"
            print(f"lipforcing train {args.stage}: stopped ({why}); {summary}; {where}")
        else:
            print(f"lipforcing train {args.stage}: {summary}; checkpoints in {cfg.output_dir}")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0
