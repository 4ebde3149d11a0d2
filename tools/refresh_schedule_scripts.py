"""Rewrite the ``.tvmscript`` beside each schedule file from its knobs and the current kernel code.

The build recreates a kernel from a schedule's knobs, so a change to a kernel's code leaves the committed
scripts showing code that no longer runs (the knobs and the tuned rates stay as the tune measured them). Run
this after such a change; ``--check`` only lists the stale scripts and exits 1 if there are any.

    python tools/refresh_schedule_scripts.py                 # every schedule under schedules/
    python tools/refresh_schedule_scripts.py --check
    python tools/refresh_schedule_scripts.py --root ~/.cache/tvm_paged/schedules
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tvm_paged.tuning.search import refresh_script

ROOT = Path(__file__).resolve().parent.parent / "schedules"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=ROOT, help="schedules folder (default: the project's schedules/)")
    p.add_argument("--check", action="store_true", help="list stale scripts, rewrite nothing, exit 1 if any")
    args = p.parse_args()
    paths = sorted(args.root.expanduser().glob("*/*.json"))
    if not paths:
        p.error(f"--root: no schedule files (<target_key>/<config>.json) under {args.root}")
    stale = [path for path in paths if refresh_script(path, write=not args.check)]
    for path in stale:
        print(("stale: " if args.check else "rewrote: ") + str(path.with_suffix(".tvmscript")))
    print(f"{len(paths)} schedules, {len(stale)} {'stale' if args.check else 'rewritten'}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
