"""``lipforcing eval``: lip sync and fidelity on held-out world clips, next to the controls (see
:mod:`lipforcing.eval.runner`)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from lipforcing.cli import UserError

HELP = ("evaluate students and the teacher on held-out world clips against controls (ground truth, VAE round trip, "
        "reference, untrained, ...)")

CONTROL_ROWS = ("ground_truth", "vae_roundtrip", "reference_copy", "untrained")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def add_args(p) -> None:
    p.add_argument("--checkpoint", action="append", default=[], metavar="[NAME=]PATH",
                   help="student weights (a df/sf run folder, checkpoint folder or file), repeatable; NAME=PATH names "
                        "the row (e.g. df=runs/df sw_dmd=runs/sf), a plain PATH is the row 'model'")
    p.add_argument("--teacher", default=None,
                   help="the bidirectional teacher (a teacher run folder, checkpoint folder or teacher.safetensors): "
                        "adds the rows teacher_cfg<scale>")
    p.add_argument("--teacher-cfg", nargs="+", default=["1.0", "4.5"], metavar="SCALE",
                   help="CFG scales of the teacher rows (default 1.0 4.5)")
    p.add_argument("--teacher-steps", default="50", help="teacher sampler steps (default 50)")
    p.add_argument("--teacher-window", default="auto",
                   help="video frames per teacher window (1 + 4k); 'auto': the length of the teacher's training "
                        "clips (from its trainer.json and data set), 21 when unknown")
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


def parse_checkpoints(specs) -> dict[str, str]:
    """``--checkpoint`` values -> {row name: path}.  ``NAME=PATH`` names the row; a plain ``PATH`` (also one that
    contains '=' but exists as it is) is the row ``model``.  Duplicate or reserved names are a UserError."""
    out: dict[str, str] = {}
    for spec in specs:
        name, path = "model", spec
        if "=" in spec and not Path(spec).exists():
            name, path = spec.split("=", 1)
            if not _NAME.fullmatch(name) or not path:
                raise UserError(f"--checkpoint {spec!r}: expected NAME=PATH (NAME of letters, digits, _ . + -) or a "
                                "path")
        if name in CONTROL_ROWS or name.startswith("teacher"):
            raise UserError(f"--checkpoint {spec!r}: the row name {name!r} is reserved for the controls and the "
                            "teacher rows; pick another NAME")
        if name in out:
            raise UserError(f"--checkpoint: two checkpoints named {name!r} ({out[name]} and {path}); give each row "
                            "its own NAME=PATH")
        out[name] = path
    return out


def parse_cfgs(values) -> list[float]:
    """``--teacher-cfg`` values -> distinct finite floats."""
    out = []
    for v in values:
        try:
            f = float(v)
        except ValueError:
            raise UserError(f"--teacher-cfg: {v!r} is not a number") from None
        if not math.isfinite(f):
            raise UserError(f"--teacher-cfg: {v!r} is not a finite number")
        if f in out:
            raise UserError(f"--teacher-cfg: {v!r} given twice")
        out.append(f)
    return out


def _positive_int(flag: str, v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise UserError(f"{flag}: {v!r} is not an integer") from None
    if n < 1:
        raise UserError(f"{flag} must be >= 1, got {n}")
    return n


def _weights_file(flag: str, path: str, names) -> str:
    from lipforcing.distill.checkpoint import resolve_checkpoint
    from lipforcing.distill.errors import TrainConfigError

    try:
        p = resolve_checkpoint(path)
    except (FileNotFoundError, TrainConfigError) as exc:
        raise UserError(f"{flag} {path}: {exc}") from None
    if p.is_dir():
        for n in names:
            if (p / n).is_file():
                return str(p / n)
        raise UserError(f"{flag} {path}: no {' / '.join(names)} in {p}")
    return str(p)


def _load(flag: str, path: str, *, causal: bool):
    import lipforcing
    from lipforcing._weights import CheckpointError

    try:
        return lipforcing.load_model(path, causal=causal)
    except (CheckpointError, ValueError, KeyError, OSError) as exc:
        raise UserError(f"{flag} {path}: {exc}") from None


def teacher_window(path: str, value: str = "auto") -> int:
    """Video frames per teacher window: ``value`` (1 + 4k), or for ``"auto"`` the length of the clips the teacher
    trained on: its checkpoint's ``trainer.json`` config (``data.kind: files``: the data set's ``meta/dataset.json``
    ``frames``; ``synthetic``: 1 + 4 (latent frames - 1)), else 21 (the data builder's default)."""
    if value != "auto":
        n = _positive_int("--teacher-window", value)
        if (n - 1) % 4:
            raise UserError(f"--teacher-window must be 1 + 4k video frames (e.g. 21), got {n}")
        return n
    try:
        from lipforcing.distill.checkpoint import resolve_checkpoint

        ck = resolve_checkpoint(path)
        data = json.loads(((ck if ck.is_dir() else ck.parent) / "trainer.json").read_text())["config"]["data"]
        if data.get("kind") == "files":
            frames = int(json.loads((Path(data["path"]) / "meta" / "dataset.json").read_text())["frames"])
        else:
            frames = 1 + 4 * (int(data.get("frames", 6)) - 1)
        if frames >= 1 and (frames - 1) % 4 == 0:
            return frames
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return 21


def run(args) -> int:
    import torch

    import lipforcing
    from lipforcing.distill.stages.vae import resolve_vae
    from lipforcing.eval.runner import EvalConfig, evaluate, write_report
    from lipforcing.eval.teacher import TeacherSystem
    from lipforcing.world.build import prompt_embedding

    for name in ("clips", "size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not args.seconds >= 2 or args.long_seconds < 0:
        raise UserError("--seconds must be >= 2 and --long-seconds >= 0")
    students = parse_checkpoints(args.checkpoint)
    cfgs = parse_cfgs(args.teacher_cfg)
    steps = _positive_int("--teacher-steps", args.teacher_steps)
    files = {name: _weights_file("--checkpoint", p, ("student.safetensors",)) for name, p in students.items()}
    teacher_file = _weights_file("--teacher", args.teacher, ("teacher.safetensors",)) if args.teacher else None
    window = teacher_window(args.teacher, args.teacher_window) if args.teacher else None
    torch.set_num_threads(1)
    vae = resolve_vae(args.vae)
    text = args.text

    def prompt(text_dim: int):
        return text if text is not None else prompt_embedding(text_dim)[None]

    engines = {}
    if teacher_file is not None:
        from lipforcing.engine.engine import _load_text

        teacher = _load("--teacher", teacher_file, causal=False).eval()
        if teacher.config.audio_dim % 2 or teacher.config.audio_dim > 512:
            raise UserError(f"--teacher {args.teacher}: audio_dim {teacher.config.audio_dim}; the world's data "
                            "builder (the teacher's conditioning) has the mel front end only (even audio_dim <= 512)")
        try:
            ctx = _load_text(prompt(teacher.config.text_dim), teacher.config.text_dim)
        except (ValueError, TypeError, OSError) as exc:
            raise UserError(f"--text {text}: {exc}") from None
        shared: dict = {}           # the CFG rows encode each clip's conditioning once
        for g in cfgs:
            engines[f"teacher_cfg{g!r}"] = TeacherSystem(teacher, vae, ctx, guidance=g, steps=steps, window=window,
                                                        seed=args.seed, cache=shared)
        print(f"lipforcing eval: teacher {teacher_file}: {steps} steps, CFG {', '.join(map(repr, cfgs))}, windows "
              f"of {window} frames")
    first = None
    for name, ck in files.items():
        model = _load("--checkpoint", ck, causal=True)
        if first is None:
            first = model.config
        engines[name] = lipforcing.Engine.load(ck, vae=vae, text=prompt(model.config.text_dim), resolution=args.size)
    if not args.no_untrained:
        from lipforcing.config import ModelConfig

        cfg = first or ModelConfig.from_name("tiny")
        engines["untrained"] = lipforcing.Engine.load(None, model=cfg, vae=vae, text=prompt(cfg.text_dim),
                                                      resolution=args.size)
    syncnet = None
    if args.syncnet:
        from lipforcing.distill.syncnet_small import load_syncnet

        syncnet = load_syncnet(_weights_file("--syncnet", args.syncnet, ("syncnet.safetensors",)))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    cfg = EvalConfig(clips=args.clips, seconds=args.seconds, size=args.size, seed=args.seed, speech=args.speech,
                     long_seconds=args.long_seconds)
    result = evaluate(engines, cfg, syncnet=syncnet, strip_path=out / "strip.png", vae=vae)
    jp, mp = write_report(result, out)
    print(mp.read_text(), end="")
    print(f"lipforcing eval: {jp}, {mp}, {out / 'strip.png'}")
    return 0
