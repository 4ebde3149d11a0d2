"""Plot a tuning run: best GB/s of K+V read against trials, one line per bucket, with each bucket's untuned
default (dashed) and the machine's memory-read roof as horizontal lines.

    python tools/plot_tuning.py tuning_logs/llvm-znver4-2c/decode_f16_h32x8_d128_p16 -o tuning.png
    python tools/plot_tuning.py LOG_DIR --schedule schedules/.../decode_f16_h32x8_d128_p16.json --roof-gbs 28

Reads the side table ``LOG_DIR/trials.jsonl`` written by ``tvm-paged tune``. Per bucket only the rows of the
latest kernel version are drawn (the workload hash of the bucket's last row); trial 0 of a bucket is its
untuned default (the tuner always measures it first), unless ``--schedule`` gives ``default_gbps``.
The roof is ``--roof-gbs``, or measured here: summing a large array (torch on every core, else numpy; best of
several passes), which is only meaningful when run on the machine that was tuned.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def read_rows(log_dir: Path) -> dict[str, list[dict]]:
    """Side-table rows per bucket, of the bucket's latest kernel version, in trial order."""
    by_bucket: dict[str, list[dict]] = {}
    path = log_dir / "trials.jsonl"
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "bucket" in row:
            by_bucket.setdefault(str(row["bucket"]), []).append(row)
    out = {}
    for bucket, rows in by_bucket.items():
        latest = rows[-1].get("workload")
        out[bucket] = [r for r in rows if r.get("workload") == latest]
    return out


def best_so_far(rows: list[dict]) -> tuple[list[int], list[float]]:
    xs, ys, best = [], [], 0.0
    for i, row in enumerate(rows, 1):
        if row.get("gbps"):
            best = max(best, float(row["gbps"]))
        if best > 0:
            xs.append(i)
            ys.append(best)
    return xs, ys


def measure_roof(mb: int = 1024, passes: int = 5) -> float:
    """GB/s of summing a float32 array of ``mb`` MiB (far larger than any last-level cache): torch's sum, which
    uses every core like the kernels do, else numpy's (one core). Best of ``passes``."""
    a = np.ones(mb * 2**20 // 4, dtype=np.float32)
    total = a.sum
    try:
        import torch  # noqa: PLC0415

        total = torch.from_numpy(a).sum
    except ImportError:
        pass
    total()
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        total()
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9


def plot(log_dir: Path, out: Path, roof_gbs: float | None, schedule: Path | None = None, title: str | None = None):
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = read_rows(log_dir)
    if not rows:
        raise ValueError(f"{log_dir / 'trials.jsonl'}: no trials")
    defaults = {}
    if schedule is not None:
        doc = json.loads(Path(schedule).read_text())
        for b in doc.get("buckets", []):
            defaults[f"{b['batch']}x{b['max_pages']}"] = b.get("default_gbps")
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for i, (bucket, brows) in enumerate(sorted(rows.items())):
        color = f"C{i % 10}"
        # The curve is the search; the closing re-timings of the default and the best ("recheck") are not trials,
        # but the default's line is its last timing (back to back with the best's, as the summary reports it).
        search = [r for r in brows if not r.get("recheck")]
        xs, ys = best_so_far(search)
        if xs:
            ax.step(xs, ys, where="post", color=color, label=f"{bucket} best ({ys[-1]:.1f} GB/s)")
        first = json.dumps(search[0].get("knobs"), sort_keys=True) if search else None
        timed = [r for r in brows if json.dumps(r.get("knobs"), sort_keys=True) == first and r.get("gbps")]
        default = defaults.get(bucket, timed[-1]["gbps"] if timed else None)
        if default:
            ax.axhline(default, color=color, linestyle="--", linewidth=1, label=f"{bucket} default ({default:.1f})")
    if roof_gbs:
        ax.axhline(roof_gbs, color="black", linewidth=1.5, label=f"memory read roof ({roof_gbs:.1f})")
    ax.set_xlabel("trials")
    ax.set_ylabel("GB/s of K+V read")
    ax.set_ylim(bottom=0)
    ax.set_title(title or f"{log_dir.name} on {log_dir.parent.name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("log_dir", type=Path, help="tuning log folder holding trials.jsonl")
    p.add_argument("-o", "--out", type=Path, default=Path("tuning.png"), help="PNG to write (default: tuning.png)")
    p.add_argument("--schedule", type=Path, default=None, help="schedule file: per-bucket default GB/s")
    p.add_argument("--roof-gbs", type=float, default=None, help="memory bandwidth roof; default: measured here")
    p.add_argument("--roof-mb", type=int, default=1024, help="array size for the measured roof (MiB)")
    p.add_argument("--no-roof", action="store_true", help="draw no roof")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    roof = None if args.no_roof else (args.roof_gbs or measure_roof(args.roof_mb))
    try:
        out = plot(args.log_dir, args.out, roof, args.schedule, args.title)
    except (OSError, ValueError) as exc:
        print(f"plot_tuning: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
