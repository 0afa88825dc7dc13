"""Reliability figures of issue 13: the bad-input table of tests/hardening/test_bad_inputs.py (this checkout's),
run against the ``lipforcing`` package of any checkout, each case classified as

  clear     the expected exception type with a message naming the argument or file (commands: exit 2, one line,
            no input file changed)
  raw       another error: a library error without the path, a traceback, a message suggesting weights_only=False
  accepted  no error: the bad input was used (silently wrong results, an overwritten input, ...)
  hang      still blocked after LIMIT seconds (a FIFO is released by a watchdog process, a loop by SIGALRM)

Not a test (pytest does not collect it).  Usage, from the repository root:

    python tests/hardening/reliability.py              # this checkout
    python tests/hardening/reliability.py /path/to/an/older/checkout
    LIMIT=60 ONLY=FIFO python tests/hardening/reliability.py ...   # per-case time limit, a subset of the cases

An older checkout is imported from its source tree (the editable install's import hook is taken out of the way);
the helper modules under tests/ always come from this checkout."""
from __future__ import annotations

import collections
import contextlib
import importlib.util
import io
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROOT = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else REPO
LIMIT = int(os.environ.get("LIMIT", "60"))
ONLY = os.environ.get("ONLY")

_WATCHDOG = """
import os, stat, sys, time
tmp, limit = sys.argv[1], float(sys.argv[2])
t0 = time.time()
while time.time() - t0 < limit + 1:
    if os.path.exists(os.path.join(tmp, "DONE")):
        sys.exit()
    time.sleep(0.5)
for f in os.listdir(tmp):
    f = os.path.join(tmp, f)
    if stat.S_ISFIFO(os.stat(f).st_mode):
        open(os.path.join(tmp, "HUNG"), "w").close()
        os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))   # unblocks a reader stuck in open() (GIL held)
"""


class Hang(BaseException):
    pass


def _alarm(*_):
    raise Hang()


def _import_root():
    sys.meta_path[:] = [f for f in sys.meta_path if "ScikitBuild" not in type(f).__name__]
    sys.path.insert(0, str(ROOT))
    import lipforcing

    assert Path(lipforcing.__file__).resolve().is_relative_to(ROOT), lipforcing.__file__
    spec = importlib.util.spec_from_file_location("tests", REPO / "tests" / "__init__.py",
                                                  submodule_search_locations=[str(REPO / "tests")])
    sys.modules["tests"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["tests"])


def _table() -> dict:
    src = (REPO / "tests" / "hardening" / "test_bad_inputs.py").read_text()
    src = src.replace("from lipforcing._weights import CheckpointError",   # older checkouts have no _weights
                      "try:\n    from lipforcing._weights import CheckpointError\nexcept ImportError:\n"
                      "    class CheckpointError(Exception):\n        pass")
    ns = {"__name__": "bad_inputs"}
    exec(compile(src, "test_bad_inputs.py", "exec"), ns)
    return ns


def _run(fn):
    """(outcome, exception or None) of fn() under the time limit, its output swallowed."""
    out, err = io.StringIO(), io.StringIO()
    signal.alarm(LIMIT)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            return fn(), None, err.getvalue()
    except Hang:
        return "hang", None, err.getvalue()
    except SystemExit as e:
        return e.code, None, err.getvalue()
    except BaseException as e:   # noqa: BLE001 - every outcome is classified
        return None, e, err.getvalue()
    finally:
        signal.alarm(0)
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__   # a Hang raised inside redirect_*'s __exit__


def main() -> int:
    _import_root()
    ns = _table()
    signal.signal(signal.SIGALRM, _alarm)
    rows = []

    def report(name, kind, detail):
        rows.append(kind)
        print(f"{name:<36} {kind:<9} {detail[:110]}", flush=True)

    for name, call, exc, match in ns["CASES"]:
        if ONLY and ONLY not in name:
            continue
        tmp = Path(tempfile.mkdtemp())
        wd = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(tmp), str(LIMIT)])
        res, e, _ = _run(lambda: call(tmp))
        (tmp / "DONE").touch()
        wd.wait()
        msg = "" if e is None else f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        if res == "hang" or (tmp / "HUNG").exists():
            kind = "hang"
        elif e is None:
            kind = "accepted"
        else:
            kind = ("clear" if isinstance(e, exc) and re.search(match, str(e)) and "weights_only=False" not in str(e)
                    else "raw")
        report(name, kind, msg)

    from lipforcing.cli import main as cli

    for name, argv, setup, match in ns["CLI_CASES"]:
        if ONLY and ONLY not in name:
            continue
        tmp = Path(tempfile.mkdtemp())
        ns["_cli_setup"](tmp, setup)
        before = {p.name: p.read_bytes() for p in tmp.iterdir() if p.is_file()}
        rc, e, err = _run(lambda: cli([a.replace("{tmp}", str(tmp)) for a in argv]))
        changed = [n for n, b in before.items() if (tmp / n).is_file() and (tmp / n).read_bytes() != b]
        last = (err.strip().splitlines() or [""])[-1]
        if rc == "hang":
            kind = "hang"
        elif e is None and rc == 2 and err.count("\n") == 1 and "Traceback" not in err and re.search(match, err) \
                and not changed:
            kind = "clear"
        elif e is None and rc == 0:
            kind = "accepted"
        else:
            kind = "raw"
        detail = (f"raised {type(e).__name__}: {e}" if e is not None else f"exit {rc}: {last}")
        report(name, kind, (f"OVERWROTE {changed}; " if changed else "") + detail)

    count = collections.Counter(rows)
    kinds = ("clear", "raw", "accepted", "hang")
    print(f"TOTAL {len(rows)} bad inputs: " + ", ".join(f"{k} {count[k]}" for k in kinds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
