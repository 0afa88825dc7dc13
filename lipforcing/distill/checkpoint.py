"""Checkpoint files of every training stage: atomic writes and validated reads.

Every file is written to a temporary file in the same folder, flushed and ``fsync``-ed, then renamed over the
target (``os.replace`` is atomic on POSIX), and the folder is fsync-ed: a kill at any moment leaves either the
old file or the new one, never half of one.  The run's ``latest`` pointer (the name of the newest ``ckpt-*``
folder) is written the same way, after the checkpoint it names is complete.

Reads refuse what cannot be resumed from, with :class:`~lipforcing.distill.errors.TrainConfigError` naming the
file: unreadable or truncated safetensors (read by :mod:`lipforcing._weights`, the project's one safe reader), a
``trainer.json`` that is not the expected JSON object, an iteration < 0, and weights with NaN or inf values.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path

import torch

from lipforcing._weights import CheckpointError, check_finite, read_safetensors
from lipforcing.distill.errors import TrainConfigError

log = logging.getLogger("lipforcing.train")

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "save_tensors", "load_tensors", "flatten_optim",
           "unflatten_optim", "keep_config_hyper", "resolve_checkpoint", "read_trainer_json", "write_checkpoint_meta"]


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write) -> None:
    """Create ``path`` atomically: ``write(tmp)`` fills a temporary file in the same folder, which is then
    fsync-ed and renamed over ``path`` (and the folder fsync-ed).  On any error the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)        # mkstemp creates 0600; give the final file the usual permissions
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path, data: bytes) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_tensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """Save a dict of tensors as safetensors, atomically (streamed to the temporary file, not built in memory);
    metadata values are stored as strings."""
    from safetensors.torch import save_file

    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=meta))


def load_tensors(path, *, finite: bool = True) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file, read through :mod:`lipforcing._weights` (the one safe
    weight-file reader); TrainConfigError naming the file when it is missing, not a regular file, empty,
    truncated or corrupt, or (``finite=True``) holds NaN/inf values."""
    try:
        tensors, meta = read_safetensors(path, "checkpoint")
        if finite:
            check_finite(tensors, os.fspath(path))
    except (FileNotFoundError, CheckpointError) as exc:
        raise TrainConfigError(str(exc)) from None
    return tensors, meta


def flatten_optim(osd: dict) -> tuple[dict, dict]:
    """An optimizer state dict -> (tensors, metadata) for safetensors."""
    tensors = {}
    for fqn, st in osd["state"].items():
        for key, val in st.items():
            tensors[f"state.{fqn}.{key}"] = val if isinstance(val, torch.Tensor) else torch.tensor(val)
    return tensors, {"param_groups": json.dumps(osd["param_groups"])}


def unflatten_optim(tensors: dict, meta: dict, *, source="optimizer state") -> dict:
    state: dict = {}
    for k, v in tensors.items():
        parts = k.split(".", 1)
        if len(parts) != 2 or parts[0] != "state" or "." not in parts[1]:
            raise TrainConfigError(f"{source}: unexpected key {k!r} (not an optimizer state file)")
        fqn, key = parts[1].rsplit(".", 1)
        state.setdefault(fqn, {})[key] = v
    try:
        groups = json.loads(meta["param_groups"])
    except (KeyError, ValueError):
        raise TrainConfigError(f"{source}: missing or invalid 'param_groups' metadata") from None
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


class keep_config_hyper:
    """``with keep_config_hyper(opt, name): opt.load_state_dict(...)``: the moments come from the checkpoint, the
    hyper-parameters (lr, betas, weight decay) stay those of this run's config; ``load_state_dict`` alone would put
    the checkpoint's back, so a resume with a lower lr after a divergence would silently keep the old one.  Each
    changed value is logged."""
    KEYS = ("lr", "betas", "weight_decay")

    def __init__(self, opt: torch.optim.Optimizer, name: str):
        self.opt, self.name = opt, name
        self.hyper = [{k: g[k] for k in self.KEYS if k in g} for g in opt.param_groups]

    def __enter__(self):
        return self.opt

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            return
        for g, h in zip(self.opt.param_groups, self.hyper):
            for k, v in h.items():
                if g[k] != v:
                    log.info("%s: %s %s from the config (the checkpoint's optimizer had %s)", self.name, k, v, g[k])
            g.update(h)


def resolve_checkpoint(path) -> Path:
    """A checkpoint directory from a run directory (its ``latest``), a ``ckpt-*`` directory, or a file."""
    p = Path(path)
    if p.is_dir() and (p / "latest").is_file():
        name = (p / "latest").read_text().strip()
        if not name or "/" in name or name in (".", ".."):
            raise TrainConfigError(f"{p / 'latest'}: does not name a checkpoint folder (got {name!r})")
        p = p / name
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found" if p == Path(path) else
                                f"checkpoint {str(p)!r} (named by {Path(path) / 'latest'}) not found")
    return p


def read_trainer_json(ck: Path) -> dict:
    """The ``trainer.json`` of checkpoint folder ``ck``, checked: a JSON object with an int ``iteration`` >= 0
    and a string ``stage``."""
    f = Path(ck) / "trainer.json"
    if not f.is_file():
        raise TrainConfigError(f"{f}: missing (not a complete checkpoint)")
    try:
        meta = json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise TrainConfigError(f"{f}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise TrainConfigError(f"{f}: expected a JSON object, got {type(meta).__name__}")
    it = meta.get("iteration")
    if isinstance(it, bool) or not isinstance(it, int) or it < 0:
        raise TrainConfigError(f"{f}: 'iteration' must be an int >= 0, got {it!r}")
    if not isinstance(meta.get("stage"), str):
        raise TrainConfigError(f"{f}: 'stage' must be a string, got {meta.get('stage')!r}")
    return meta


def write_checkpoint_meta(ck: Path, out: Path | None, meta: dict) -> None:
    """Write ``trainer.json`` into ``ck`` (after the weights), then point ``out/latest`` at it."""
    def _clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        return v

    atomic_write_text(Path(ck) / "trainer.json", json.dumps({k: _clean(v) for k, v in meta.items()}, indent=1))
    if out is not None:
        atomic_write_text(Path(out) / "latest", Path(ck).name)
