"""Helpers shared by the subcommands: argument types and checks (seed, device, dtype, resolution, checkpoint,
threads), :func:`load_engine` with one-line errors, the progress display of long commands and
:func:`writing_video` (what a video-writing command does on success, Ctrl-C or an error)."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import TYPE_CHECKING

from lipforcing.cli import Interrupted, UserError

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that need it: `lipforcing --help` and every subcommand's --help must
# answer without it (tests/cli/test_cli_hardening.py checks sys.modules)
PRESETS = ("tiny", "1.3b", "14b")
DTYPES = ("fp32", "bf16", "fp16")   # names Engine.load takes


def seed_arg(text: str) -> int:
    """argparse ``type=`` of the ``--seed`` options: an int in [0, 2**64)."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not 0 <= seed < 1 << 64:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**64 - 1, got {seed}")
    return seed


class _LineProgress:
    """The progress of :func:`progress` where stderr is not a terminal: one plain line at most every
    ``interval`` seconds (none for work shorter than that), instead of a bar redrawn ten times a second."""

    def __init__(self, total: int, desc: str, unit: str, file, interval: float):
        self.total, self.desc, self.unit, self.file, self.interval = total, desc, unit, file, interval
        self.n = 0
        self.start = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self.last = now
            rate = self.n / max(now - self.start, 1e-9)
            pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
            print(f"{self.desc}: {self.n}/{self.total} {self.unit}s{pct}, {rate:.1f} {self.unit}/s, "
                  f"{now - self.start:.0f} s", file=self.file, flush=True)

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def close(self) -> None:
        pass

    def __enter__(self) -> "_LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int, desc: str, *, unit: str = "frame", file=None, interval: float = 10.0):
    """A progress display on stderr for long work: a tqdm bar on a terminal; elsewhere (a log file, a pipe, CI)
    a plain line every ``interval`` seconds.  Either way it has ``update(n)``, ``set_description``, ``close`` and
    works as a context manager."""
    file = sys.stderr if file is None else file
    isatty = getattr(file, "isatty", None)
    if isatty is not None and isatty():
        from tqdm import tqdm

        return tqdm(total=total, unit=unit, desc=desc, file=file, dynamic_ncols=True, leave=False)
    return _LineProgress(total, desc, unit, file, interval)


@contextlib.contextmanager
def writing_video(writer, total: int):
    """The block that streams frames into ``writer`` (a :class:`lipforcing.media.VideoWriter` of ``total``
    frames).  Completed: the writer is closed (its partial file becomes the output).  Ctrl-C / SIGTERM: the frames
    so far stay in a playable partial file and :class:`Interrupted` says how many.  Any other error: the partial
    file is discarded and the error propagates."""
    try:
        yield writer
    except KeyboardInterrupt:
        kept = writer.abort()
        raise Interrupted(f"interrupted after {writer.frames} of {total} frames; "
                          + (f"partial output kept as {kept}" if kept else "nothing written")) from None
    except BaseException:
        writer.abort()
        raise
    writer.close()


def check_device(device: str | None) -> torch.device:
    """The ``--device`` argument as a torch.device, with one-line errors for unusable devices."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device!r} is not a device name; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA GPU is visible to torch (torch.cuda.is_available() is False); "
                            "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type != "cpu":
        raise UserError(f"--device {device}: only cpu and cuda devices are supported")
    return dev


def check_resolution(resolution: int | None) -> None:
    """``--resolution`` by the engine's own rule (before the engine is loaded), as a one-line error."""
    if resolution is not None:
        from lipforcing.engine.engine import parse_resolution

        try:
            parse_resolution(resolution, resolution)
        except (TypeError, ValueError) as exc:
            raise UserError(f"--resolution {resolution}: {exc}") from None


def check_output_path(option: str, path: str | None, *, plot: bool = False) -> None:
    """Before any work is done: ``path`` (the value of ``option``, e.g. ``--json``) can be written: not a folder,
    not a FIFO or socket (a write would block or fail), its folder exists and the file can be created; with
    ``plot``, a file type matplotlib can write.  A file created by the check is removed again."""
    import stat

    if path is None:
        return
    if os.path.isdir(path):
        raise UserError(f"{option} {path}: is a folder (give the path of a file to write)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{option} {path}: the folder {folder} does not exist")
    if plot:
        try:
            from matplotlib.backend_bases import FigureCanvasBase
        except ImportError:
            raise UserError(f"{option} needs matplotlib (pip install 'lipforcing[media]')") from None
        kinds = sorted(FigureCanvasBase.get_supported_filetypes())
        ext = os.path.splitext(path)[1].lower().lstrip(".")
        if ext not in kinds:
            raise UserError(f"{option} {path}: matplotlib cannot write '.{ext}' files (use "
                            f"{', '.join('.' + k for k in ['png'] + [k for k in kinds if k != 'png'])})")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        raise UserError(f"{option} {path}: is a {'FIFO' if stat.S_ISFIFO(mode) else 'socket'}, not a file")
    try:
        with open(path, "ab"):
            pass
    except OSError as exc:
        raise UserError(f"{option} {path}: cannot write it ({exc.strerror})") from None
    if mode is None:
        os.remove(path)


def check_checkpoint(path: str | None) -> None:
    if path is not None and not os.path.exists(path):
        raise UserError(f"--checkpoint {path}: no such file or folder")


def set_threads(threads: int | None, model: str, device: torch.device) -> None:
    """``--threads``: default 1 for the tiny preset on the CPU (its tensors are too small to split), else torch's.
    :func:`load_engine` hands the resulting count to ``Engine.load(threads=...)``."""
    import torch

    if threads is None:
        threads = 1 if model == "tiny" and device.type == "cpu" else None
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def add_decoder_arg(p: argparse.ArgumentParser) -> None:
    """The ``--decoder`` option of profile, sync and demo."""
    p.add_argument("--decoder", default="wan", metavar="wan|taehv|PATH",
                   help="latent-to-frame decoder: wan (the Wan VAE's, exact; default), taehv (the TAEHV "
                        "architecture with random weights: speed only), or a taew2_1.pth/.safetensors file")


def load_decoder_arg(decoder: str | None, debug: bool = False):
    """``--decoder`` -> what ``Engine.load(decoder=...)`` takes; a checkpoint is read here so that its problems
    become one-line errors naming the option."""
    if decoder is None or decoder.lower() in ("wan", "taehv"):
        return decoder
    if not os.path.exists(decoder):
        raise UserError(f"--decoder {decoder}: no such file (expected wan, taehv or a taew2_1.pth/.safetensors "
                        "file)")
    from lipforcing.decoders import load_decoder

    try:
        return load_decoder(decoder)
    except (ValueError, OSError) as exc:
        if debug:
            raise
        raise UserError(f"--decoder {decoder}: {' '.join(str(exc).split())}") from exc


def load_engine(*, model: str = "tiny", checkpoint: str | None = None, device=None, dtype: str | None = None,
                seed: int = 0, resolution: int | None = None, cuda_graphs: bool = False, debug: bool = False,
                decoder: str | None = None, vae: str | None = None, audio_encoder: str | None = None,
                text: str | None = None, mask: str | None = None):
    """``Engine.load`` for the commands: problems with the checkpoint, resolution, decoder or options become
    one-line :class:`UserError` s (the original exception with ``debug``).  ``vae``, ``audio_encoder``, ``text``,
    ``mask``: the ``--vae`` / ``--audio-encoder`` / ``--text`` / ``--mask`` values (paths; ``vae`` may also be a
    preset name), checked to exist here.  Returns (engine, load seconds)."""
    import torch

    from lipforcing import Engine

    dev = check_device(device)
    check_checkpoint(checkpoint)
    if cuda_graphs and dev.type != "cuda":
        raise UserError("--cuda-graphs needs a CUDA device (--device cuda)")
    for option, value in (("--vae", vae), ("--audio-encoder", audio_encoder), ("--text", text), ("--mask", mask)):
        if value is not None and not (option == "--vae" and value in ("tiny", "wan2.1")) \
                and not os.path.exists(value):
            raise UserError(f"{option} {value}: no such file or folder")
    t = time.perf_counter()
    dec = load_decoder_arg(decoder, debug)
    try:
        # threads: what set_threads (or torch) decided, so Engine.load's own default does not override --threads
        engine = Engine.load(checkpoint, model=model, device=dev, dtype=dtype, seed=seed,
                             threads=torch.get_num_threads() if dev.type == "cpu" else None,
                             resolution=resolution, cuda_graphs=cuda_graphs, decoder=dec, vae=vae,
                             audio_encoder=audio_encoder, text=text, mask=mask)
    except (ValueError, TypeError, OSError, KeyError, ImportError) as exc:
        if debug:
            raise
        msg = " ".join(str(exc).split())
        if checkpoint is not None:
            raise UserError(f"cannot load checkpoint {checkpoint}: {msg}") from exc
        if resolution is not None and "resolution" in msg:
            raise UserError(f"--resolution {resolution}: {msg}") from exc
        for option, value in (("--vae", vae), ("--audio-encoder", audio_encoder), ("--text", text),
                              ("--mask", mask)):
            if value is not None:
                msg += f" (with {option} {value})"
        raise UserError(f"cannot build the {model or 'default'} engine: {msg}") from exc
    return engine, time.perf_counter() - t
