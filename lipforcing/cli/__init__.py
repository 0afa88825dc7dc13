"""The ``lipforcing`` command: the parser, the subcommands and how errors become exit codes.

Each subcommand is a module of this package with ``HELP`` (one line), ``add_args(parser)`` and ``run(args) -> int``;
:data:`SUBCOMMANDS` lists them in the order ``lipforcing --help`` shows them.  Shared argument and engine helpers
live in :mod:`lipforcing.cli._common`.  The library never imports this package.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import signal
import sys

__all__ = ["main", "UserError", "Interrupted", "SUBCOMMANDS", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE",
           "EXIT_INTERRUPTED"]

EXIT_OK = 0
EXIT_FAILURE = 1        # the command ran but did not succeed (e.g. bench --compare found no common rows)
EXIT_USAGE = 2          # bad input: a one-line error (argparse uses 2 as well)
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM: one line saying what was kept (128 + SIGINT, the shell convention)

SUBCOMMANDS = ("demo", "sync", "profile", "bench", "train", "data", "eval", "serve")


class UserError(Exception):
    """A problem with the user's input: printed as one line (no traceback unless --debug)."""


class Interrupted(KeyboardInterrupt):
    """Raised by a command that was interrupted (Ctrl-C / SIGTERM) after cleaning up; its message is the one line
    ``main`` prints (what was done and what was kept)."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions shown as one line with exit code 2: the commands' own and the library's input errors."""
    from lipforcing._weights import CheckpointError
    from lipforcing.distill.trainer import TrainConfigError
    from lipforcing.media import MediaError

    return UserError, MediaError, FileNotFoundError, TrainConfigError, CheckpointError


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    """The argument parser and ``{name: run}`` of the subcommands."""
    from lipforcing import __version__

    parser = argparse.ArgumentParser(prog="lipforcing", description="Real-time streaming lip sync (Lip Forcing).")
    parser.add_argument("--version", action="version", version=f"lipforcing {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    runs = {}
    for name in SUBCOMMANDS:
        mod = importlib.import_module(f"lipforcing.cli.{name}")
        p = sub.add_parser(name, help=mod.HELP)
        mod.add_args(p)
        # --debug also after the subcommand (lipforcing sync ... --debug); SUPPRESS keeps the main parser's value
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        runs[name] = mod.run
    return parser, runs


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt in the main thread while a command runs, so that it cleans up like Ctrl-C."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:            # not the main thread (main() called from a worker): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv=None) -> int:
    parser, runs = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING, format="%(message)s")
    try:
        with _sigterm_as_interrupt():
            return runs[args.command](args) or EXIT_OK
    except KeyboardInterrupt as exc:
        if args.debug:
            raise
        line = str(exc) if isinstance(exc, Interrupted) and str(exc) else "interrupted"
        print(f"\nlipforcing {args.command}: {line}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _user_errors() as exc:
        if args.debug:
            raise
        print(f"lipforcing {args.command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
