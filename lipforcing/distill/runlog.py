"""What every training stage records: one JSON line of metrics per logged iteration (``metrics.jsonl``), a PNG of
the loss curves (``curves.png``), and plain progress lines."""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

__all__ = ["append_metrics", "read_metrics", "plot_curves", "Progress"]

log = logging.getLogger("lipforcing.train")


def append_metrics(out: Path, stage: str, m: dict) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    with open(Path(out) / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"stage": stage, **m}) + "\n")


def read_metrics(out: Path) -> list[dict]:
    """The rows of ``metrics.jsonl`` (unparsable lines, e.g. one cut by a kill, are skipped).  After a resume
    the rows of the re-run iterations replace the earlier ones."""
    f = Path(out) / "metrics.jsonl"
    rows: dict = {}
    if not f.is_file():
        return []
    for line in f.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and "iteration" in r:
            rows[(r.get("stage"), r["iteration"])] = r
    return sorted(rows.values(), key=lambda r: (str(r.get("stage")), r["iteration"]))


def plot_curves(out: Path, *, keys=None, path=None, smooth: int = 0) -> Path | None:
    """Plot every ``*loss*``, ``*psnr*``, ``acc*`` and ``*gain`` metric (or ``keys``) of ``out/metrics.jsonl`` against the iteration into
    ``out/curves.png`` (log scale when all values are positive; a moving average of ``smooth`` points drawn on
    top).  Returns the PNG's path, or None without metrics or matplotlib."""
    rows = read_metrics(out)
    if not rows:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the media/test extras
        return None
    names = keys or sorted({k for r in rows for k, v in r.items()
                            if ("loss" in k or "psnr" in k or k.startswith("acc") or k.endswith("gain"))
                            and isinstance(v, (int, float))})
    if not names:
        return None
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 2.2 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        pts = [(r["iteration"], r[name]) for r in rows
               if isinstance(r.get(name), (int, float)) and math.isfinite(r[name])]
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.plot(xs, ys, lw=0.8, alpha=0.5 if smooth else 1.0)
        n = smooth or max(1, len(ys) // 50)
        if n > 1 and len(ys) > n:
            avg = [sum(ys[i - n + 1:i + 1]) / n for i in range(n - 1, len(ys))]
            ax.plot(xs[n - 1:], avg, lw=1.5)
        if all(y > 0 for y in ys) and "psnr" not in name and not name.startswith("acc"):
            ax.set_yscale("log")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("iteration")
    stage = rows[-1].get("stage", "")
    fig.suptitle(f"lipforcing train {stage}: {Path(out).name}")
    fig.tight_layout()
    dest = Path(path) if path else Path(out) / "curves.png"
    fig.savefig(dest, dpi=90)
    plt.close(fig)
    return dest


class Progress:
    """A plain progress line every ``interval`` seconds: iteration, rate, ETA and the latest losses."""

    def __init__(self, stage: str, start: int, total: int, interval: float = 10.0):
        self.stage, self.start, self.total, self.interval = stage, start, total, interval
        self.t0 = self.last = time.perf_counter()

    def update(self, iteration: int, m: dict) -> None:
        now = time.perf_counter()
        if now - self.last < self.interval and iteration + 1 < self.total:
            return
        self.last = now
        done = iteration + 1 - self.start
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - iteration - 1) / max(rate, 1e-9)
        losses = " ".join(f"{k}={v:.4g}" for k, v in m.items() if "loss" in k and isinstance(v, float))
        log.info("train %s: %d/%d (%.2f it/s, eta %.0f s) %s", self.stage, iteration + 1, self.total, rate, eta,
                 losses)
