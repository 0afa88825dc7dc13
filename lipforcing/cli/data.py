"""``lipforcing data build``: render procedural-world clips and encode them with a VAE into training latents."""
from __future__ import annotations

from lipforcing.cli import UserError

HELP = "build training data: world clips encoded with a VAE into the latent files the teacher/df/sf stages read"


def add_args(p) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    b = sub.add_parser("build", help="render world clips and encode them (resumable: existing files are kept)")
    b.add_argument("--vae", required=True, help="vae run folder (runs/vae), checkpoint folder or weight file")
    b.add_argument("--out", required=True, help="output folder of clip-*.safetensors")
    b.add_argument("--clips", type=int, default=64, help="number of clips (default 64)")
    b.add_argument("--frames", type=int, default=21, help="video frames per clip, 1 + 4k (default 21)")
    b.add_argument("--size", type=int, default=64, help="crop size in pixels (default 64)")
    b.add_argument("--split", choices=("train", "eval"), default="train",
                   help="training or held-out identities and speech")
    b.add_argument("--speech", choices=("auto", "espeak", "synthetic"), default="auto")
    b.add_argument("--model", default="tiny", help="DiT preset whose audio/text sizes the files follow")
    b.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    import torch

    from lipforcing.cli._common import progress
    from lipforcing.config import ModelConfig
    from lipforcing.distill.stages.vae import resolve_vae
    from lipforcing.world.build import build_latent_dataset

    if args.action != "build":  # pragma: no cover - argparse enforces it
        raise UserError(f"unknown action {args.action!r}")
    if args.speech == "espeak":
        from lipforcing.world.speech import espeak_available

        if not espeak_available():
            raise UserError("--speech espeak: espeak-ng is not installed (apt-get install espeak-ng)")
    try:
        mcfg = ModelConfig.from_name(args.model)
    except ValueError as exc:
        raise UserError(f"--model: {exc}") from None
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    vae = resolve_vae(args.vae)
    bar = progress(args.clips, "data build", unit="clip")
    done = [0]

    def tick(i, n):
        bar.update(i - done[0])
        done[0] = i

    try:
        files = build_latent_dataset(args.out, vae, num_clips=args.clips, frames=args.frames, size=args.size,
                                     split=args.split, seed=args.seed, model_config=mcfg, speech=args.speech,
                                     progress=tick)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    finally:
        bar.close()
    print(f"lipforcing data build: {len(files)} clips ({args.split}) in {args.out}; "
          f"prompt embedding in {args.out}/meta/text.safetensors")
    return 0
