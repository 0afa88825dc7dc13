"""``lipforcing profile``: end-to-end FPS, time to first frame and the per-stage breakdown on synthetic input (the
measuring itself is :mod:`lipforcing.profiling`)."""
from __future__ import annotations

import argparse
import sys

from lipforcing.cli import UserError
from lipforcing.cli._common import (DTYPES, PRESETS, add_decoder_arg, check_checkpoint, check_device,
                                    check_output_path, check_resolution, load_engine, progress, seed_arg, set_threads)

HELP = "end-to-end FPS, time to first frame and per-stage breakdown on synthetic input"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", choices=PRESETS, help="model preset (default tiny)")
    p.add_argument("--checkpoint", help="student weights (default: random weights; speed does not depend on them)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--chunks", type=int, default=16, help="chunks to measure (default 16)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up chunks, excluded (default 3)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the DiT chunk forward (default off)")
    p.add_argument("--cuda-graphs", action="store_true", help="replay the DiT passes as CUDA graphs")
    p.add_argument("--backend", default="auto", choices=["auto", "cuda", "triton", "reference"],
                   help="kernel backend for every op (sets LIPFORCING_BACKEND)")
    p.add_argument("--resolution", type=int, default=None,
                   help="face-crop size (default 512; 32 for the tiny preset)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: 1 for the tiny preset on the CPU, whose tensors are too "
                        "small to split; else torch's default)")
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of the random weights, input and noise")
    add_decoder_arg(p)
    p.add_argument("--frame-size", metavar="WxH", default=None,
                   help="stream full frames of this size (e.g. 1280x720) with a moving face instead of aligned "
                        "crops, so the face stages (tracking, face_align, paste_back) are measured too")
    p.add_argument("--json", metavar="PATH", help="write every number to this JSON file")
    p.add_argument("--plot", metavar="PATH.png", help="write the stage breakdown and latency plot")
    p.add_argument("--force", action="store_true", help="run the 1.3b/14b presets on the CPU anyway (hours)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _frame_size(text: str | None):
    """``--frame-size WxH`` -> (H, W), or None."""
    if text is None:
        return None
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--frame-size {text}: expected WIDTHxHEIGHT, e.g. 1280x720") from None
    if not (64 <= w <= 8192 and 64 <= h <= 8192):
        raise UserError(f"--frame-size {text}: width and height must be between 64 and 8192")
    return h, w


def run(args) -> int:
    from lipforcing.ops import BackendUnavailable
    from lipforcing.profiling import format_report, plot_profile, run_profile, write_json

    dev = check_device(args.device)
    check_checkpoint(args.checkpoint)
    if args.model != "tiny" and dev.type == "cpu" and not args.force:
        raise UserError(f"--model {args.model} on the CPU would take hours; use --model tiny, a GPU (--device cuda), "
                        "or --force")
    if args.chunks < 1:
        raise UserError(f"--chunks must be >= 1, got {args.chunks}")
    check_resolution(args.resolution)
    frame_size = _frame_size(args.frame_size)
    if args.warmup < 1 or (args.cuda_graphs and args.warmup < 2):
        raise UserError(f"--warmup must be >= 1 (>= 2 with --cuda-graphs), got {args.warmup}")
    if args.dtype in ("bf16", "fp16") and dev.type == "cpu":
        print(f"note: {args.dtype} on the CPU says little about a GPU; fp32 is the CPU default",
              file=sys.stderr)
    check_output_path("--json", args.json)
    check_output_path("--plot", args.plot, plot=True)
    set_threads(args.threads, args.model, dev)
    engine, load_s = load_engine(model=args.model, checkpoint=args.checkpoint, device=dev, dtype=args.dtype,
                                 seed=args.seed, resolution=args.resolution, cuda_graphs=args.cuda_graphs,
                                 debug=args.debug, decoder=args.decoder)
    try:
        doc = run_profile(model=args.model, checkpoint=args.checkpoint, chunks=args.chunks, warmup=args.warmup,
                          compile=args.compile, backend=args.backend, seed=args.seed,
                          progress=progress if args.progress else None, engine=engine, frame_size=frame_size)
    except BackendUnavailable as exc:
        if args.debug:
            raise
        raise UserError(f"--backend {args.backend}: {' '.join(str(exc).split())}") from exc
    doc["warmup"]["engine_load_s"] = load_s
    print(format_report(doc))
    if args.json:
        write_json(doc, args.json)
        print(f"\nwrote {args.json}")
    if args.plot:
        plot_profile(doc, args.plot)
        print(f"wrote {args.plot}")
    return 0
