"""The ``lipforcing`` command: the parser, the subcommands and how errors become exit codes.

Each subcommand is a module of this package with ``HELP`` (one line), ``add_args(parser)`` and ``run(args) -> int``;
:data:`SUBCOMMANDS` lists them in the order ``lipforcing --help`` shows them.  Shared argument and engine helpers
live in :mod:`lipforcing.cli._common`.  The library never imports this package.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

__all__ = ["main", "UserError", "SUBCOMMANDS", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE"]

EXIT_OK = 0
EXIT_FAILURE = 1        # the command ran but did not succeed (e.g. bench --compare found no common rows)
EXIT_USAGE = 2          # bad input: a one-line error (argparse uses 2 as well)

SUBCOMMANDS = ("demo", "sync", "profile", "bench", "train", "data", "eval", "serve")


class UserError(Exception):
    """A problem with the user's input: printed as one line (no traceback unless --debug)."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions shown as one line with exit code 2: the commands' own and the library's input errors."""
    from lipforcing.distill.trainer import TrainConfigError
    from lipforcing.media import MediaError

    return UserError, MediaError, FileNotFoundError, TrainConfigError


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    """The argument parser and ``{name: run}`` of the subcommands."""
    parser = argparse.ArgumentParser(prog="lipforcing", description="Real-time streaming lip sync (Lip Forcing).")
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


def main(argv=None) -> int:
    parser, runs = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING, format="%(message)s")
    try:
        return runs[args.command](args) or EXIT_OK
    except _user_errors() as exc:
        if args.debug:
            raise
        print(f"lipforcing {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
