"""``lipforcing serve``: the WebSocket server (protocol in docs/serving.md and :mod:`lipforcing.serve.protocol`)."""
from __future__ import annotations

import argparse
import os

from lipforcing.cli import UserError
from lipforcing.cli._common import (DTYPES, PRESETS, check_checkpoint, check_device, check_resolution, load_engine,
                                    seed_arg, set_threads)

HELP = "serve lip sync over WebSocket (PCM in, frames out) with /health and Prometheus /metrics"


def _max_sessions(text: str):
    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, none or a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8765, help="TCP port (default 8765)")
    p.add_argument("--model", default="tiny", choices=PRESETS, help="model preset (default tiny)")
    p.add_argument("--checkpoint", help="student weights (default: random weights, i.e. NOT real lip sync)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--resolution", type=int, default=None, help="face-crop size (default 512; 32 for tiny)")
    p.add_argument("--avatars", help="folder of prepared avatars: <id>.mp4 / .png / .jpg / .npy reference clips, or "
                        "<id>.safetensors saved by engine.prepare")
    p.add_argument("--max-batch", type=int, default=8, help="most sessions per DiT pass (default 8; 1 = no batching)")
    p.add_argument("--max-sessions", type=_max_sessions, default="auto",
                   help="admission control: auto (the measured real-time capacity, default), none, or a number")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: 1 for tiny on CPU)")
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of the random weights")
    p.add_argument("--force", action="store_true", help="serve the 1.3b/14b presets on the CPU anyway")


def run(args) -> int:
    import importlib.util

    if importlib.util.find_spec("aiohttp") is None:
        raise UserError("lipforcing serve needs aiohttp: pip install 'lipforcing[serve]'")
    from lipforcing.serve.server import serve

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {args.port}")
    if args.max_batch < 1:
        raise UserError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.avatars is not None and not os.path.isdir(args.avatars):
        raise UserError(f"--avatars {args.avatars}: not a folder")
    dev = check_device(args.device)
    check_checkpoint(args.checkpoint)
    check_resolution(args.resolution)
    if args.model != "tiny" and dev.type == "cpu" and not args.force:
        raise UserError(f"--model {args.model} on the CPU is far from real time; use a GPU (--device cuda), "
                        "--model tiny, or --force")
    set_threads(args.threads, args.model, dev)
    engine, _ = load_engine(model=args.model, checkpoint=args.checkpoint, device=dev, dtype=args.dtype,
                            seed=args.seed, resolution=args.resolution, debug=args.debug)
    engine.scheduler.configure(max_batch=args.max_batch, max_sessions=args.max_sessions)
    serve(engine, host=args.host, port=args.port, avatars=args.avatars)
    return 0
