"""What the training stages share: config validation, seeded randomness, the loop (progress, metrics, curves),
and atomic, validated checkpoints.

A stage subclasses :class:`Stage` with a config dataclass (subclass of :class:`StageConfig`), ``build()`` (create
``self.models = {name: (module, optimizer)}``) and ``step(k) -> metrics``.  Every random draw of iteration k is a
function of (seed, k, tag), so a resumed run repeats the uninterrupted one exactly.

Stopping early: ``train(stop=StopRequest(max_minutes))`` returns after the iteration in progress once the wall-time
budget is spent or :meth:`StopRequest.request` was called (the handler :func:`stop_on_signals` installs for SIGTERM /
SIGINT), and saves as at the end of a run; the student stages' loop (:class:`lipforcing.distill.trainer.Trainer`)
takes the same ``stop``.

Checkpoints: ``output_dir/ckpt-<iteration>/<name>.safetensors`` (weights, with the metadata ``weight_metadata``
returns), ``optim_<name>.safetensors``, ``trainer.json``; ``output_dir/latest`` names the newest.  Stages may add
exported files (``export(ck)``, e.g. the VAE's latent statistics).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from lipforcing.distill import checkpoint as ckpt
from lipforcing.distill.errors import TrainConfigError
from lipforcing.distill.runlog import Progress, append_metrics, plot_curves

__all__ = ["StageConfig", "Stage", "StopRequest", "stop_on_signals", "stop_reason", "check_positive_number",
           "check_int", "config_from_dict", "config_from_yaml", "read_config_yaml"]

log = logging.getLogger("lipforcing.train")


def check_positive_number(name: str, v, *, allow_none: bool = False, allow_zero: bool = False) -> None:
    """TrainConfigError unless ``v`` is a finite real number > 0 (>= 0 with ``allow_zero``)."""
    if v is None and allow_none:
        return
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (
        v >= 0 if allow_zero else v > 0)
    if not ok:
        raise TrainConfigError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} number, got {v!r}")


def check_int(name: str, v, *, minimum: int = 1) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise TrainConfigError(f"{name} must be an int >= {minimum}, got {v!r}")


def config_from_dict(cls, d: dict, where: str = "config"):
    """``cls(**d)`` with unknown keys and wrong types reported as TrainConfigError."""
    if not isinstance(d, dict):
        raise TrainConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise TrainConfigError(f"unknown {where} fields {unknown}; known: {sorted(names)}")
    try:
        return cls(**d)
    except TypeError as exc:
        raise TrainConfigError(f"{where}: {exc}") from None


def read_config_yaml(path, overrides: dict) -> dict:
    """The YAML mapping in ``path`` (an empty file is ``{}``) with the ``overrides`` that are not None applied;
    TrainConfigError when the file holds something other than a mapping."""
    import yaml

    with open(path) as f:
        d = yaml.safe_load(f) or {}
    if not isinstance(d, dict):
        raise TrainConfigError(f"{path}: expected a mapping of config fields, got {type(d).__name__}")
    d.update({k: v for k, v in overrides.items() if v is not None})
    return d


def config_from_yaml(cls, path, **overrides):
    """Read a YAML mapping of ``cls``'s fields; ``overrides`` that are not None win."""
    return config_from_dict(cls, read_config_yaml(path, overrides))


_clock = time.monotonic          # the wall clock of StopRequest (a module attribute so tests can replace it)


class StopRequest:
    """When a training loop stops early: once ``max_minutes`` of wall time have passed since ``start`` (default: when
    this object is made), or once :meth:`request` was called (e.g. by a signal).  The loop asks :func:`stop_reason`
    before each iteration; an iteration in progress always finishes, and the loop then saves as at its end."""

    def __init__(self, max_minutes: float | None = None, *, start: float | None = None):
        check_positive_number("max_minutes", max_minutes, allow_none=True)
        self.max_minutes = max_minutes
        self.start = _clock() if start is None else float(start)
        self.requested: str | None = None

    def request(self, reason: str) -> None:
        """Stop after the iteration in progress (the first reason given is kept)."""
        if self.requested is None:
            self.requested = reason

    def reason(self) -> str | None:
        """Why the loop should stop now, or None."""
        if self.requested is not None:
            return self.requested
        if self.max_minutes is not None and _clock() - self.start >= 60.0 * self.max_minutes:
            return f"max_minutes {self.max_minutes:g} reached"
        return None


def stop_reason(stop: StopRequest | None, device=None) -> str | None:
    """``stop.reason()``; under torch.distributed every rank agrees (any rank's reason stops all of them, so that
    the collective checkpoint save is reached by all)."""
    if stop is None:
        return None
    why = stop.reason()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        dev = device if device is not None and torch.device(device).type == "cuda" else torch.device("cpu")
        flag = torch.tensor([0.0 if why is None else 1.0], device=dev)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if why is None and float(flag) > 0:
            why = "another rank stopped"
    return why


@contextlib.contextmanager
def stop_on_signals(stop: StopRequest, signals=(signal.SIGTERM, signal.SIGINT)):
    """While the block runs, SIGTERM / SIGINT ask ``stop`` to stop after the iteration in progress instead of
    interrupting it; a second SIGINT raises KeyboardInterrupt at once (the last checkpoint is kept).  Installed only
    in the main thread (Python delivers signals there; elsewhere this does nothing); the previous handlers are
    restored on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if signum == signal.SIGINT and stop.requested is not None:
            raise KeyboardInterrupt
        stop.request(signal.Signals(signum).name)
        log.warning("%s: stopping after the iteration in progress (checkpoint follows)", signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@dataclass
class StageConfig:
    """Fields every stage has (the stage's own dataclass adds its fields)."""

    stage: str = ""
    iterations: int = 10
    batch_size: int = 1
    lr: float = 1e-4
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: Optional[float] = 1.0
    seed: int = 0
    device: str = "cpu"
    output_dir: str = "runs/stage"
    save_every: int = 0
    log_every: int = 1
    plot_every: int = 0
    resume: bool = True

    def __post_init__(self):
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        check_positive_number("lr", self.lr)
        check_positive_number("weight_decay", self.weight_decay, allow_zero=True)
        check_positive_number("grad_clip", self.grad_clip, allow_none=True)
        if (not isinstance(self.betas, tuple) or len(self.betas) != 2
                or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas)):
            raise TrainConfigError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        check_int("iterations", self.iterations, minimum=0)
        check_int("batch_size", self.batch_size)
        for name in ("seed", "save_every", "log_every", "plot_every"):
            check_int(name, getattr(self, name), minimum=0)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)):
            raise TrainConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


class Stage:
    """One training run of a stage (see the module docstring)."""

    name = ""
    Config = StageConfig

    def __init__(self, config):
        if not isinstance(config, self.Config):
            raise TypeError(f"config must be a {self.Config.__name__}, got {type(config).__name__}")
        self.cfg = config
        dev = config.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(dev)
        self.rank = 0
        self.out = Path(config.output_dir)
        self.iteration = 0
        self.stopped: str | None = None      # why the last train() returned early (None: it ran to the end)
        self.history: list[dict] = []
        self.models: dict = {}
        torch.manual_seed(config.seed)
        self.build()
        if config.resume and (self.out / "latest").is_file():
            self.load(self.out)

    # to implement ------------------------------------------------------------------------------------------
    def build(self) -> None:
        raise NotImplementedError

    def step(self, k: int) -> dict:
        raise NotImplementedError

    def weight_metadata(self, name: str) -> dict:
        return {}

    def export(self, ck: Path) -> None:
        """Extra files written into each checkpoint folder (before trainer.json)."""

    def close(self) -> None:
        """Release what the stage holds between iterations (e.g. worker processes); called when ``train`` returns,
        and the next ``train`` may start them again."""

    # randomness ----------------------------------------------------------------------------------------------
    def generator(self, *tags) -> torch.Generator:
        """A CPU generator determined by (seed, tags) only."""
        h = hashlib.sha256(repr((self.cfg.seed,) + tags).encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))

    def seed_of(self, *tags) -> int:
        h = hashlib.sha256(repr((self.cfg.seed,) + tags).encode()).digest()
        return int.from_bytes(h[:4], "little")

    def optimizer(self, module: torch.nn.Module, lr: float | None = None) -> torch.optim.Optimizer:
        c = self.cfg
        return torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=c.lr if lr is None else lr,
                                 betas=tuple(c.betas), weight_decay=c.weight_decay)

    def clip_and_step(self, name: str, loss: torch.Tensor) -> float:
        model, opt = self.models[name]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, float(self.cfg.grad_clip or float("inf"))) if params else 0.0
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(norm)

    # loop ----------------------------------------------------------------------------------------------------
    def train(self, iterations: int | None = None, *, stop: StopRequest | None = None) -> list[dict]:
        """Run until ``iterations`` (default ``config.iterations``) iterations are done in total, or until ``stop``
        says so (checked before each iteration; ``self.stopped`` holds its reason); save at ``save_every`` and when
        the loop ends; returns the metrics of the iterations run here."""
        total = self.cfg.iterations if iterations is None else int(iterations)
        ran = []
        self.stopped = None
        prog = Progress(self.name, self.iteration, total)
        try:
            while self.iteration < total:
                self.stopped = stop_reason(stop, self.device)
                if self.stopped:
                    break
                k = self.iteration
                t0 = time.perf_counter()
                for m in self.models.values():
                    m[0].train()
                m = {"iteration": k, **self.step(k), "seconds": time.perf_counter() - t0}
                bad = [n for n, v in m.items() if isinstance(v, float) and not math.isfinite(v)]
                if bad:
                    raise FloatingPointError(f"stage {self.name}: non-finite {', '.join(bad)} at iteration {k}; "
                                             "lower lr (the last checkpoint is kept)")
                self.iteration = k + 1
                self.history.append(m)
                ran.append(m)
                if self.cfg.log_every and k % self.cfg.log_every == 0:
                    append_metrics(self.out, self.name, m)
                prog.update(k, m)
                if self.cfg.save_every and self.iteration % self.cfg.save_every == 0:
                    self.save()
                if self.cfg.plot_every and self.iteration % self.cfg.plot_every == 0:
                    plot_curves(self.out)
            if ran and not (self.cfg.save_every and self.iteration % self.cfg.save_every == 0):
                self.save()
            if ran:
                plot_curves(self.out)
        finally:
            self.close()
        return ran

    # checkpoints ---------------------------------------------------------------------------------------------
    def save(self, path=None) -> Path:
        ck = Path(path) if path is not None else self.out / f"ckpt-{self.iteration:06d}"
        ck.mkdir(parents=True, exist_ok=True)
        for name, (model, opt) in self.models.items():
            ckpt.save_tensors(model.state_dict(), ck / f"{name}.safetensors", self.weight_metadata(name))
            tensors, meta = ckpt.flatten_optim(opt.state_dict())
            ckpt.save_tensors(tensors, ck / f"optim_{name}.safetensors", meta)
        self.export(ck)
        ckpt.write_checkpoint_meta(ck, self.out if path is None else None,
                                   {"iteration": self.iteration, "stage": self.name, "config": self.cfg.to_dict()})
        return ck

    def load(self, path) -> None:
        """Resume: weights, optimizer states, iteration (all validated before anything is changed)."""
        ck = ckpt.resolve_checkpoint(path)
        meta = ckpt.read_trainer_json(ck)
        if meta["stage"] != self.name:
            raise TrainConfigError(f"checkpoint {ck} is from stage {meta['stage']!r}, this run is {self.name!r}")
        loaded = {}
        for name in self.models:
            sd, _ = ckpt.load_tensors(ck / f"{name}.safetensors")
            osd_t, ometa = ckpt.load_tensors(ck / f"optim_{name}.safetensors")
            loaded[name] = (sd, ckpt.unflatten_optim(osd_t, ometa, source=ck / f"optim_{name}.safetensors"))
        for name, (sd, osd) in loaded.items():
            model, opt = self.models[name]
            try:
                model.load_state_dict(sd)
                if osd["state"]:
                    with ckpt.keep_config_hyper(opt, name):     # moments from the file, lr etc. from the config
                        opt.load_state_dict(_match_optim(osd, opt))
            except (RuntimeError, ValueError, KeyError) as exc:
                raise TrainConfigError(f"{ck / (name + '.safetensors')}: does not fit this run's {name} "
                                       f"({' '.join(str(exc).split())[:300]})") from None
        self.iteration = int(meta["iteration"])
        log.info("resumed %s from %s at iteration %d", self.name, ck, self.iteration)


def _match_optim(osd: dict, opt: torch.optim.Optimizer) -> dict:
    """Saved optimizer state keyed by parameter index strings -> the int keys ``load_state_dict`` expects."""
    state = {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in osd["state"].items()}
    return {"state": state, "param_groups": osd["param_groups"]}
