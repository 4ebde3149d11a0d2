"""The tuning log of one (config, target): MetaSchedule's ``JSONDatabase`` plus a side table.

``<work_dir>/database_workload.json``: one line per bucket and kernel version: the signature of the kernel
specialized to the bucket (shapes of every argument), tagged with the config, bucket and kernel text hash; the
body is left out (a full kernel is ~300 KB there, and the builder recreates it from the knobs).
``database_tuning_record.json``: one line per trial, with an empty trace (the variants differ in how their builder
wrote them, not in schedule instructions), the measured seconds per call, the target and the argument shapes; a
failed trial has MetaSchedule's 1e10 s.
``trials.jsonl`` (the side table): one line per trial, in the same order, mapping it back to its bucket and knob
dict, with the kernel's text hash (a row measured on an older kernel is not reused), GB/s of K+V read and the
wall time the trial's build and measurement took.

Each trial is committed to the database and then to the side table as soon as it is measured, so an interrupted
run leaves both valid; at worst one trial is in the database without its side row, and is measured again.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import struct
import time
from pathlib import Path

from .. import tuned_knobs
from .. import tvm_compat as tc

SIDE_TABLE = "trials.jsonl"
FAILED_SECS = 1e10  # what MetaSchedule records for a failed build or run


def default_root() -> Path:
    """Where a tune's logs go unless ``--work-dir`` says otherwise: ``tuning_logs/`` in the user's tvm_paged folder
    (``~/.cache/tvm_paged/tuning_logs``), beside the schedules the tune writes there."""
    return tuned_knobs.user_root() / "tuning_logs"


def workload_hash(mod) -> str:
    """A short hash of a workload module's text: changes whenever the kernel's IR changes."""
    return hashlib.sha256(mod.script().encode()).hexdigest()[:16]


class TuningLog:
    """Database + side table in ``work_dir`` (created on first use)."""

    def __init__(self, work_dir: Path | str):
        self.dir = Path(work_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.side_path = self.dir / SIDE_TABLE
        self._ms = tc.meta_schedule()
        self.db = self._ms.database.JSONDatabase(work_dir=str(self.dir))

    def rows(self) -> list[dict]:
        """Side-table rows; a torn last line (an interrupt mid-write) is skipped."""
        if not self.side_path.exists():
            return []
        out = []
        for line in self.side_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "bucket" in row and "knobs" in row:
                out.append(row)
        return out

    def compact(self) -> None:
        """Shrink the database's workload file for committing (see :func:`compact_workload_file`)."""
        compact_workload_file(self.dir / "database_workload.json")

    def commit_workload(self, mod):
        return self.db.commit_workload(mod)

    def commit(self, workload, mod, target, row: dict, run_secs: list[float] | None) -> dict:
        """Commit one trial: the database record first, then its side row (returned, with a timestamp)."""
        ms = self._ms
        secs = run_secs if run_secs else [FAILED_SECS]
        record = ms.database.TuningRecord(
            trace=tc.Trace([], {}),  # no instructions: the variant is measured as its builder wrote it
            workload=workload,
            run_secs=[tc.tirx.FloatImm("float64", float(s)) for s in secs],
            target=target,
            args_info=ms.arg_info.ArgInfo.from_entry_func(mod),
        )
        self.db.commit_tuning_record(record)
        row = {**row, "run_secs": [float(s) for s in run_secs] if run_secs else None, "time": round(time.time(), 1)}
        line = json.dumps(row, sort_keys=True) + "\n"
        with open(self.side_path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        return row


def median_secs(run_secs: list[float] | None) -> float | None:
    if not run_secs:
        return None
    vals = sorted(float(s) for s in run_secs)
    mid = len(vals) // 2
    m = vals[mid] if len(vals) % 2 else 0.5 * (vals[mid - 1] + vals[mid])
    return m if math.isfinite(m) and 0 < m < FAILED_SECS else None


def compact_workload_file(path) -> None:
    """Rewrite a MetaSchedule ``database_workload.json`` without the indentation TVM serializes each module
    with (about half its size; the tuning logs are committed). Each line is ``[hash, base64(8-byte little-endian
    length + JSON)]``; a line in another format is kept as it is. Written to a temporary file, then renamed."""
    path = Path(path)
    if not path.exists():
        return
    lines = []
    for line in path.read_text().splitlines():
        try:
            key, blob = json.loads(line)
            raw = base64.b64decode(blob)
            (size,) = struct.unpack("<Q", raw[:8])
            body = json.dumps(json.loads(raw[8:8 + size]), separators=(",", ":")).encode()
            line = json.dumps([key, base64.b64encode(struct.pack("<Q", len(body)) + body).decode()])
        except (ValueError, TypeError, struct.error):
            pass
        lines.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in lines))
    os.replace(tmp, path)
