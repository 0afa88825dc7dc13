"""Worker for test_trainer.py's FSDP2 check: a few training iterations of the tiny preset, run single-process or
under ``torchrun`` (gloo on CPU); rank 0 writes the final student (and critic) weights and the losses."""
from __future__ import annotations

import argparse
import json
import sys

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--stage", required=True, help="df, sf or both (df then sf, into <out>/df and <out>/sf)")
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--fsdp", default="auto")
    p.add_argument("--per-block", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    stages = ("df", "sf") if a.stage == "both" else (a.stage,)
    for stage in stages:
        run(a, stage, a.out + "/" + stage if a.stage == "both" else a.out)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def run(a, stage: str, out: str) -> None:
    import os

    os.makedirs(out, exist_ok=True)
    from safetensors.torch import save_file

    from lipforcing.distill.trainer import Trainer, TrainConfig

    cfg = TrainConfig(stage=stage, iterations=a.iterations, batch_size=a.batch_size, output_dir=out + "/run",
                      resume=False, fsdp=a.fsdp, fsdp_per_block=bool(a.per_block), device="cpu",
                      critic_updates_per_student=2, lr=1e-3, critic_lr=1e-3, attn_backend="reference",
                      data={"num_samples": 4, "frames": 6, "height": 4, "width": 4, "text_len": 4})
    tr = Trainer(cfg)
    hist = tr.train()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sds = {name: get_model_state_dict(m, options=opts) for name, m in (("student", tr.student), ("critic", tr.critic))
           if m is not None}
    if tr.rank == 0:
        for name, sd in sds.items():
            save_file({k: v.contiguous() for k, v in sd.items()}, f"{out}/{name}.safetensors")
        with open(f"{out}/history.json", "w") as f:
            json.dump(hist, f)


if __name__ == "__main__":
    sys.exit(main())
