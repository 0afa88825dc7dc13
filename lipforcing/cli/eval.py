"""``lipforcing eval``: lip sync and fidelity on held-out world clips, next to the controls (see
:mod:`lipforcing.eval.runner`)."""
from __future__ import annotations

from pathlib import Path

from lipforcing.cli import UserError

HELP = "evaluate a student on held-out world clips against controls (ground truth, reference, untrained, ...)"


def add_args(p) -> None:
    p.add_argument("--checkpoint", default=None,
                   help="student weights (a df/sf run folder, checkpoint folder or file); omitted: controls only")
    p.add_argument("--vae", required=True, help="the world VAE: a vae run folder, checkpoint folder or weight file")
    p.add_argument("--syncnet", default=None, help="the world SyncNet (syncnet run folder or file) for LSE-C/LSE-D")
    p.add_argument("--text", default=None, help="prompt embedding (.safetensors), e.g. <data>/meta/text.safetensors")
    p.add_argument("--clips", type=int, default=4)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--long-seconds", type=float, default=0.0, help="stability run length (0: skip)")
    p.add_argument("--speech", choices=("auto", "espeak", "synthetic"), default="auto")
    p.add_argument("--no-untrained", action="store_true", help="skip the untrained-model control")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", default="eval", help="output folder (eval.json, eval.md, strip.png)")


def _weights_file(path: str, names) -> str:
    from lipforcing.distill.checkpoint import resolve_checkpoint

    p = resolve_checkpoint(path)
    if p.is_dir():
        for n in names:
            if (p / n).is_file():
                return str(p / n)
        raise UserError(f"{path}: no {' / '.join(names)} in {p}")
    return str(p)


def run(args) -> int:
    import torch

    import lipforcing
    from lipforcing.distill.stages.vae import resolve_vae
    from lipforcing.eval.runner import EvalConfig, evaluate, write_report

    for name in ("clips", "size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not args.seconds >= 2 or args.long_seconds < 0:
        raise UserError("--seconds must be >= 2 and --long-seconds >= 0")
    torch.set_num_threads(1)
    vae = resolve_vae(args.vae)
    text = args.text
    if text is None:
        from lipforcing.world.build import prompt_embedding

    engines = {}
    if args.checkpoint:
        ck = _weights_file(args.checkpoint, ("student.safetensors",))
        model = lipforcing.load_model(ck, causal=True)
        t = text if text is not None else prompt_embedding(model.config.text_dim)[None]
        engines["model"] = lipforcing.Engine.load(ck, vae=vae, text=t, resolution=args.size)
    if not args.no_untrained:
        from lipforcing.config import ModelConfig

        cfg = engines["model"].model.config if engines else ModelConfig.from_name("tiny")
        t = text if text is not None else prompt_embedding(cfg.text_dim)[None]
        engines["untrained"] = lipforcing.Engine.load(None, model=cfg, vae=vae, text=t, resolution=args.size)
    syncnet = None
    if args.syncnet:
        from lipforcing.distill.syncnet_small import load_syncnet

        syncnet = load_syncnet(_weights_file(args.syncnet, ("syncnet.safetensors",)))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    cfg = EvalConfig(clips=args.clips, seconds=args.seconds, size=args.size, seed=args.seed, speech=args.speech,
                     long_seconds=args.long_seconds)
    result = evaluate(engines, cfg, syncnet=syncnet, strip_path=out / "strip.png")
    jp, mp = write_report(result, out)
    print(mp.read_text(), end="")
    print(f"lipforcing eval: {jp}, {mp}, {out / 'strip.png'}")
    return 0
