"""The ``lipforcing`` command.  Subcommands register themselves in ``COMMANDS`` (name -> (help, add_args, run))."""
from __future__ import annotations

import argparse
import logging
import sys

COMMANDS: dict[str, tuple] = {}


class UserError(Exception):
    """A problem with the user's input: printed as one line (no traceback unless --debug)."""


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
        add_args(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING, format="%(message)s")
    try:
        return COMMANDS[args.command][2](args) or 0
    except (UserError, FileNotFoundError) as exc:
        if args.debug:
            raise
        print(f"lipforcing {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
