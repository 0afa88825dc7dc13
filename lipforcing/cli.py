"""The ``lipforcing`` command.  Subcommands register themselves in ``COMMANDS`` (name -> (help, add_args, run))."""
from __future__ import annotations

import argparse
import logging
import sys
import time

COMMANDS: dict[str, tuple] = {}


class UserError(Exception):
    """A problem with the user's input: printed as one line (no traceback unless --debug)."""


def command(name: str, help: str):
    def register(add_args):
        def wrap(run):
            COMMANDS[name] = (help, add_args, run)
            return run
        return wrap
    return register


# ----------------------------------------------------------------------------------------------------------- demo

def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chunks", type=int, default=8, help="chunks to stream (default 8)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto", choices=["auto", "cuda", "triton", "reference"])


@command("demo", "run the embedded default end to end and print what it did")(_demo_args)
def _demo(args) -> int:
    """Streams a small synthetic clip through the ops of one student layer: chunk attention over the rolling
    cache (checked against the full-sequence block-causal op), the fused audio cross-attention and the two-step
    denoising update."""
    import torch

    import lipforcing
    from lipforcing import ops

    if args.chunks < 1:
        raise UserError(f"--chunks must be >= 1, got {args.chunks}")
    dev = torch.device(args.device)
    g = torch.Generator(device="cpu").manual_seed(0)
    grid, frames_per_chunk, heads, head_dim = (4, 4), 3, 2, 32
    tpf = grid[0] * grid[1]
    chunk, window, sink = frames_per_chunk * tpf, 6 * tpf, tpf
    L = args.chunks * chunk
    q, k, v = (torch.randn(1, L, heads, head_dim, generator=g).to(dev) for _ in range(3))
    print(f"lipforcing demo: one attention layer, {args.chunks} chunks x {frames_per_chunk} latent frames x {tpf} "
          f"tokens, window {window // tpf} frames incl. {sink // tpf} sink frame, device {dev}")
    cache = lipforcing.RollingKVCache(1, heads, head_dim, chunk_size=chunk, window=window, sink=sink, device=dev)
    t0 = time.perf_counter()
    outs = [ops.chunk_attention(q[:, s:s + chunk], k[:, s:s + chunk], v[:, s:s + chunk], cache, write=True,
                                backend=args.backend) for s in range(0, L, chunk)]
    t_stream = time.perf_counter() - t0
    full = ops.block_causal_attention(q, k, v, chunk_size=chunk, window=window, sink=sink, backend=args.backend)
    err = (torch.cat(outs, 1) - full).abs().max().item()
    print(f"  chunk_attention: streamed {L} tokens through a {cache.capacity}-slot cache in {t_stream * 1e3:.1f} ms; "
          f"max |streamed - block_causal_attention| = {err:.2e}")
    text = torch.randn(1, 7, heads, head_dim, generator=g).to(dev)
    audio = torch.randn(1, frames_per_chunk, 4, heads, head_dim, generator=g).to(dev)
    out = ops.audio_cross_attention(q[:, :chunk], text, text, audio, audio, tokens_per_frame=tpf,
                                    backend=args.backend)
    print(f"  audio_cross_attention: {tuple(out.shape)} from 7 text tokens + 4 audio tokens per frame")
    x = torch.randn(1, 16, frames_per_chunk, 8, 8, generator=g).to(dev)
    flow = torch.randn(1, 16, frames_per_chunk, 8, 8, generator=g).to(dev)
    x0, x_next = ops.denoise_update(x, flow, 0.999, 0.769, seed=0, backend=args.backend)
    x0b, final = ops.denoise_update(x_next, flow, 0.769, 0.0, backend=args.backend)
    print(f"  denoise_update: t 0.999 -> 0.769 -> 0 on latents {tuple(x.shape)}; "
          f"x_next std {x_next.std().item():.3f}, final == x0: {bool(torch.equal(x0b, final))}")
    ok = err < (1e-4 if q.dtype == torch.float32 else 1e-2)
    print("demo " + ("passed" if ok else "FAILED: streamed output differs from the full-sequence op"))
    return 0 if ok else 1


# ----------------------------------------------------------------------------------------------------------- main

def _load_optional_commands() -> None:
    # Subcommands that live in their own modules register themselves on import.
    import importlib

    for mod in ("lipforcing.profile", "lipforcing.sync", "lipforcing.distill.trainer", "lipforcing.bench_cli"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise


def main(argv=None) -> int:
    _load_optional_commands()
    parser = argparse.ArgumentParser(prog="lipforcing", description="Real-time streaming lip sync (Lip Forcing).")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING, format="%(message)s")
    try:
        return COMMANDS[args.command][2](args) or 0
    except (UserError, FileNotFoundError) as exc:
        if args.debug:
            raise
        print(f"lipforcing {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
