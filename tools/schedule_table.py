"""The committed schedules side by side: for each configuration and bucket, the tuned knobs on every CPU kind and
what they gain over the defaults there (the tuner's own measurement, K+V GB/s tuned / default in one run).

    python tools/schedule_table.py                  # every target key under schedules/
    python tools/schedule_table.py --root schedules --targets llvm-znver3-2c,llvm-znver5-2c

Prints a markdown table: a knob is shown only where it differs from the kernel's default on that target (the
default-kept buckets read "defaults"). The numbers come from each file's buckets (``gbps``, ``default_gbps``),
measured by ``tvm-paged tune`` on that machine; ratios between columns are not comparable (different machines).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "schedules"


def load(root: Path, keys: list[str] | None) -> dict[str, dict[str, dict]]:
    """{target_key: {config name: schedule file contents}} for the chosen (or every) target key."""
    out = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if keys and folder.name not in keys:
            continue
        out[folder.name] = {f.stem: json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))}
    return out


def _knob_text(knobs: dict, defaults: dict) -> str:
    diff = [f"{k}={v}" for k, v in sorted(knobs.items()) if defaults.get(k) != v]
    return ", ".join(diff) if diff else "defaults"


def _defaults(config: str, target: dict) -> dict:
    """The kernel's default knobs for ``config`` on the schedule's own target (lanes follow the vector width)."""
    from tvm_paged import tuned_knobs, tvm_compat  # noqa: PLC0415
    from tvm_paged.config import KernelConfig  # noqa: PLC0415

    space = tuned_knobs.knob_space(KernelConfig.from_name(config), tvm_compat.Target(target))
    return {name: values[0] for name, values in space.items()}


def table(schedules: dict[str, dict[str, dict]]) -> str:
    keys = list(schedules)
    rows = sorted({(cfg, b["batch"], b["max_pages"]) for per in schedules.values() for cfg, d in per.items()
                   for b in d["buckets"]})
    head = "| config | batch x pages | " + " | ".join(f"{k}: tuned knobs (gain)" for k in keys) + " |"
    lines = [head, "| --- | --- | " + " | ".join("---" for _ in keys) + " |"]
    defaults = {}
    for cfg, batch, pages in rows:
        cells = []
        for key in keys:
            d = schedules[key].get(cfg)
            bucket = next((b for b in (d or {}).get("buckets", []) if (b["batch"], b["max_pages"]) == (batch, pages)),
                          None)
            if bucket is None:
                cells.append("-")
                continue
            if (key, cfg) not in defaults:
                defaults[key, cfg] = _defaults(cfg, d["target"])
            gain = bucket["gbps"] / bucket["default_gbps"] if bucket.get("default_gbps") else float("nan")
            cells.append(f"{_knob_text(bucket['knobs'], defaults[key, cfg])} ({gain:.2f}x)")
        lines.append(f"| {cfg} | {batch} x {pages} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=ROOT, help="the schedules folder (default: the project's)")
    p.add_argument("--targets", default="", help="comma-separated target keys (default: every one)")
    args = p.parse_args(argv)
    print(table(load(args.root, [k for k in args.targets.split(",") if k] or None)))


if __name__ == "__main__":
    main()
