"""``lipforcing train``: distil a student with :class:`lipforcing.distill.Trainer` from a YAML config."""
from __future__ import annotations

import logging
from pathlib import Path

from lipforcing.cli import UserError

HELP = "distil a student: stage 1 diffusion forcing (df) or stage 2 Self-Forcing DMD (sf)"


def add_args(p) -> None:
    from lipforcing.distill.trainer import STAGES

    p.add_argument("--stage", required=True, choices=STAGES,
                   help="df: stage 1 diffusion-forcing init; sf: stage 2 Self-Forcing with Sync-Window DMD")
    p.add_argument("--config", required=True, help="YAML file with the TrainConfig fields")
    p.add_argument("--output-dir", default=None, help="override output_dir")
    p.add_argument("--iterations", type=int, default=None, help="override iterations")
    p.add_argument("--device", default=None, help="override device (auto, cpu, cuda)")
    p.add_argument("--no-resume", action="store_true", help="start fresh even if output_dir has a checkpoint")


def run(args) -> int:
    path = Path(args.config)
    if not path.is_file():
        raise UserError(f"--config {args.config!r}: no such file")
    overrides = {"stage": args.stage, "output_dir": args.output_dir, "iterations": args.iterations,
                 "device": args.device}
    if args.no_resume:
        overrides["resume"] = False
    import torch
    import yaml

    from lipforcing.distill.trainer import TrainConfig, Trainer

    try:
        cfg = TrainConfig.from_yaml(path, **overrides)
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
    trainer = Trainer(cfg)
    start = trainer.iteration
    ran = trainer.train()
    if trainer.rank == 0:
        last = ran[-1] if ran else {}
        keys = [k for k in last if k.endswith("loss")]
        summary = ", ".join(f"{k} {last[k]:.4g}" for k in keys)
        print(f"lipforcing train {cfg.stage}: iterations {start} -> {trainer.iteration}"
              + (f"; last {summary}" if summary else "") + f"; checkpoints in {cfg.output_dir}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0
