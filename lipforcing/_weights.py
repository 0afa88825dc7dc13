"""Opening weight files safely: the one place that reads ``.safetensors`` and ``.pt``/``.pth`` files for every
loader (model, VAE, text embeddings, latent datasets).

Guarantees
    * the path is checked first: missing -> ``FileNotFoundError``; a directory, FIFO, socket or device ->
      :class:`CheckpointError` (a FIFO would block ``open`` forever); an empty file -> :class:`CheckpointError`;
    * truncated or corrupt files give a :class:`CheckpointError` that names the file and what is wrong, never a
      raw library error without the path;
    * pickles go only through ``torch.load(weights_only=True)``; a file holding other Python objects is refused,
      and the message never suggests turning safe loading off;
    * :func:`check_finite` refuses NaN/inf weights, naming the tensors (a NaN weight makes every output NaN, i.e.
      black frames, so loading it is never what the caller wants).
"""
from __future__ import annotations

import os
import pickle
import re
import stat
from pathlib import Path
from typing import Mapping

import torch

_MAX_LISTED = 12


class CheckpointError(ValueError):
    """A weight file is unreadable or does not fit the model (bad format, missing / unexpected / mis-shaped
    keys, non-finite values)."""


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def regular_file(path, what: str = "checkpoint") -> Path:
    """``path`` as a Path after checking it names a non-empty regular file (symlinks to one are fine)."""
    p = Path(os.fspath(path))
    try:
        st = p.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {p} does not exist") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {what} {p}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"{what} {p} is a directory, expected a file")
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file")
        raise CheckpointError(f"{what} {p} is {kind}; only regular files are read")
    if st.st_size == 0:
        raise CheckpointError(f"{what} {p} is empty (0 bytes)")
    return p


def read_safetensors(path, what: str = "checkpoint") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors on the CPU, metadata) of a safetensors file, or a CheckpointError naming the file."""
    from safetensors import SafetensorError, safe_open

    p = regular_file(path, what)
    try:
        sd = {}
        with safe_open(str(p), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            for k in f.keys():
                sd[k] = f.get_tensor(k)
    except (SafetensorError, OSError, ValueError, RuntimeError, OverflowError) as exc:
        raise CheckpointError(f"{what} {p} is not a readable safetensors file (truncated or corrupt?): "
                              f"{_first_line(exc)}") from None
    return sd, meta


def _unpickling_reason(exc: BaseException) -> str:
    """What torch's weights-only unpickler objected to, without its advice on loading the file unsafely."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "weights_only" not in ln]
    return lines[0].split(" Please ")[0].split(" To ")[0][:300] if lines else "unreadable pickle"


def _short(exc: BaseException) -> str:
    reason = _first_line(exc).split(". This is")[0]
    return type(exc).__name__ if "weights_only" in reason else reason


def read_torch_file(path, what: str = "checkpoint"):
    """``torch.load(path, weights_only=True)`` on the CPU (memory-mapped when the format allows), with errors
    that name the file.  Pickled Python objects beyond tensors and plain containers are refused."""
    p = regular_file(path, what)
    try:
        try:
            return torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:   # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(exc) and "zip" not in str(exc).lower():
                raise
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _unpickling_reason(exc)
        if "Unsupported global" in reason:
            raise CheckpointError(
                f"refusing to load {what} {p}: it holds pickled Python objects, and only tensors and plain "
                f"containers are read from pickles (for safety). Save only the tensor state dict, or convert "
                f"it to safetensors. ({reason})") from None
        raise CheckpointError(f"{what} {p} is not a readable torch file (truncated, corrupt or not written by "
                              f"torch.save): {reason}") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{what} {p} is not a readable torch file (truncated, corrupt or not written by "
                              f"torch.save): {_short(exc)}") from None


def read_weight_file(path, what: str = "checkpoint") -> tuple[object, dict[str, str]]:
    """(contents, metadata) of a ``.safetensors`` file (a dict of tensors) or any other suffix through
    :func:`read_torch_file` (whatever tensors/containers it holds; metadata empty)."""
    if str(path).lower().endswith(".safetensors"):
        return read_safetensors(path, what)
    return read_torch_file(path, what), {}


def nonfinite_tensors(sd: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating tensors of ``sd`` holding a NaN or an infinity."""
    bad = []
    for k, v in sd.items():
        if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex()) and v.numel():
            if not bool(torch.isfinite(v).all()):
                bad.append(k)
    return bad


def check_finite(sd: Mapping[str, torch.Tensor], source, what: str = "checkpoint") -> None:
    """Raise a CheckpointError naming the tensors of ``sd`` that hold NaN or inf."""
    bad = nonfinite_tensors(sd)
    if bad:
        shown = ", ".join(bad[:_MAX_LISTED]) + (f" ... and {len(bad) - _MAX_LISTED} more"
                                                 if len(bad) > _MAX_LISTED else "")
        raise CheckpointError(f"{what} {source} holds NaN or inf values in {len(bad)} tensor(s): {shown} "
                              "(refused: they would make every output NaN)")
