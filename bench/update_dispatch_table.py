"""Fill lipforcing/ops/dispatch_table.json from a GPU benchmark run: the order ``backend="auto"`` tries.

    python bench/update_dispatch_table.py bench/results/<gpu>_<date>/bench.json --arch sm_90 [--write]

For every (op, dtype, head_dim) the backends of lipforcing's own ops (cuda, triton and the library backends of
chunk_attention) are ranked by their median time relative to the fastest backend of each shape, averaged over the
shapes they ran; a backend that missed shapes others ran comes after those that ran them all.  Rows of the plain
op only: ``_rope`` variants and the baselines are left out.
Rows of the same (op, arch, dtype, head_dim) in the table are replaced; the others are kept.  Without
``--write`` the new table is printed.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "lipforcing" / "ops" / "dispatch_table.json"
RANKED = ("cuda", "triton", "flash_attn", "cudnn")


def rank(rows: list[dict], arch: str, source: str) -> list[dict]:
    """Table entries (op, arch, dtype, head_dim, order, source, median_us) from benchmark rows."""
    times: dict[tuple, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if r.get("backend") not in RANKED or "D" not in r.get("shape", {}):
            continue
        shape = dict(r["shape"])
        key = (r["op"], r["dtype"], int(shape.pop("D")))
        times[key][r["backend"]][json.dumps(shape, sort_keys=True)] = float(r["median_us"])
    entries = []
    for (op, dtype, head_dim), per_backend in sorted(times.items()):
        shapes = set().union(*(set(t) for t in per_backend.values()))
        best = {sh: min(t[sh] for t in per_backend.values() if sh in t) for sh in shapes}
        # time relative to the fastest backend of each shape, averaged over the shapes the backend ran
        slowdown = {b: sum(t[sh] / best[sh] for sh in t) / len(t) for b, t in per_backend.items()}
        missing = {b: len(shapes) - len(t) for b, t in per_backend.items()}
        order = sorted(per_backend, key=lambda b: (missing[b], slowdown[b], RANKED.index(b)))
        entries.append({"op": op, "arch": arch, "dtype": dtype, "head_dim": head_dim, "order": order,
                        "source": source, "slowdown_vs_best": {b: round(slowdown[b], 3) for b in order}})
    return entries


def merge(table: dict, entries: list[dict]) -> dict:
    """``table`` with the rows of the same (op, arch, dtype, head_dim) as ``entries`` replaced by them."""
    keys = {(e["op"], e["arch"], e["dtype"], e["head_dim"]) for e in entries}
    kept = [e for e in table.get("entries", []) if (e["op"], e["arch"], e["dtype"], e["head_dim"]) not in keys]
    return {**table, "entries": kept + entries}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, help="benchmark JSON (lipforcing.benchmarking.write)")
    ap.add_argument("--arch", required=True, help="compute capability of the GPU that ran it, e.g. sm_90")
    ap.add_argument("--write", action="store_true", help=f"update {TABLE.relative_to(ROOT)} in place")
    args = ap.parse_args(argv)
    doc = json.loads(args.results.read_text())
    entries = rank(doc.get("rows", []), args.arch, str(args.results))
    table = merge(json.loads(TABLE.read_text()), entries)
    text = json.dumps(table, indent=2) + "\n"
    if args.write:
        TABLE.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
