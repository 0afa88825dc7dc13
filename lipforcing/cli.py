"""The ``lipforcing`` command.  Subcommands register themselves in ``COMMANDS`` (name -> (help, add_args, run))."""
from __future__ import annotations

import argparse
import logging
import sys
import time

COMMANDS: dict[str, tuple] = {}


class UserError(Exception):
    """A problem with the user's input: printed as one line (no traceback unless --debug)."""


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


def command(name: str, help: str):
    def register(add_args):
        def wrap(run):
            COMMANDS[name] = (help, add_args, run)
            return run
        return wrap
    return register


# ----------------------------------------------------------------------------------------------------------- demo

def _demo_args(p: argparse.ArgumentParser) -> None:
    from lipforcing.demo import add_args

    add_args(p)


@command("demo", "stream a synthetic face clip and speech through the embedded default model, write demo.mp4 "
                 "and print a profile summary")(_demo_args)
def _demo(args) -> int:
    from lipforcing.demo import run

    return run(args)


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
        p = sub.add_parser(name, help=help_text)
        add_args(p)
        # --debug also after the subcommand (lipforcing sync ... --debug); SUPPRESS keeps the main parser's value
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING, format="%(message)s")
    from lipforcing.media import MediaError

    try:
        return COMMANDS[args.command][2](args) or 0
    except (UserError, MediaError, FileNotFoundError) as exc:
        if args.debug:
            raise
        print(f"lipforcing {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
