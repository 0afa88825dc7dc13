"""``lipforcing bench``: run the kernel micro-benchmarks of bench/ and write one JSON; ``--compare`` prints ratios."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from lipforcing.cli import UserError

HELP = "run kernel micro-benchmarks (GPU) or compare two result files"

_CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # above lipforcing/cli/
OPS = ("chunk_attention", "block_causal_attention", "audio_cross_attention", "denoise_update", "model")


def _find_bench_dir(explicit: str | None) -> str:
    candidates = [explicit] if explicit else [os.path.join(os.getcwd(), "bench"),
                                              os.path.join(_CHECKOUT, "bench")]
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "conftest.py")):
            return c
    if explicit:
        raise UserError(f"--bench-dir {explicit}: not a benchmark suite (no conftest.py there); give the bench/ "
                        "folder of a lipforcing checkout")
    raise UserError("no benchmark suite found: run from a lipforcing checkout (it has bench/) or pass --bench-dir")


def _check_result_file(path: str) -> None:
    """A ``--compare`` input: a JSON document with a ``rows`` list of benchmark rows."""
    import json

    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    try:
        with open(path) as fh:
            doc = json.load(fh)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path}: not a JSON file ({exc})") from exc
    rows = doc.get("rows") if isinstance(doc, dict) else None
    keys = ("op", "backend", "shape", "dtype", "median_us")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and all(k in r for k in keys) for r in rows):
        raise UserError(f"{path}: not a benchmark result (expected the JSON that `lipforcing bench --json` writes: "
                        f"a 'rows' list with {', '.join(keys)})")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--op", choices=OPS, action="append", help="benchmark only this op (repeatable; default all)")
    p.add_argument("--backend", action="append", help="keep only cases whose id contains this backend name "
                                                      "(repeatable, e.g. --backend triton --backend sdpa)")
    p.add_argument("-k", dest="filter", help="extra pytest -k expression (e.g. shapes: 'H40 and 7168')")
    p.add_argument("--json", default="bench/results/latest.json", help="where to write the rows")
    p.add_argument("--bench-dir", help="the bench/ directory (default: ./bench)")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="print speed-ups of B over A and exit")


def run(args) -> int:
    if args.compare:
        from lipforcing.benchmarking import compare

        for path in args.compare:
            _check_result_file(path)
        rows = compare(*args.compare)
        if not rows:
            print("no common rows (op, backend, shape, dtype) between the two files")
            return 1
        print(f"{'op':24} {'backend':10} {'dtype':9} {'shape':40} {'A us':>10} {'B us':>10} {'A/B':>7}")
        for (op, backend, shape, dtype), a, b, ratio in rows:
            print(f"{op:24} {backend:10} {dtype:9} {shape[:40]:40} {a:10.1f} {b:10.1f} {ratio:7.2f}")
        return 0
    bench_dir = _find_bench_dir(args.bench_dir)
    import torch

    if not torch.cuda.is_available():
        raise UserError("the kernel benchmarks need a CUDA GPU (torch.cuda.is_available() is False): every case "
                        "would be skipped and no JSON written; --compare A.json B.json works without one")
    files = [os.path.join(bench_dir, f"test_bench_{op}.py") for op in (args.op or OPS)]
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        raise UserError(f"no benchmark files for {args.op} in {bench_dir}")
    expr = [f"({' or '.join(args.backend)})"] if args.backend else []
    if args.filter:
        expr.append(f"({args.filter})")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, "--bench-json",
           os.path.abspath(args.json), "-o", "addopts="]
    if expr:
        cmd += ["-k", " and ".join(expr)]
    print("running:", " ".join(cmd))
    return subprocess.call(cmd, cwd=os.path.dirname(bench_dir))
