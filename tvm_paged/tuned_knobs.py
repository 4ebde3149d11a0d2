"""Committed tuned schedules: where the build looks for something better than the default.

A schedule file ``schedules/<target_key>/<config name>.json`` is data written by ``tvm-paged tune``: for each tuned
workload bucket (batch x max pages per sequence) the builder knobs that measured fastest, their GB/s of K+V read
and the untuned default's. With no file for a (config, target), :func:`lookup` returns ``None`` and the kernel is
built with its default knobs. A file that is corrupt, or written for another config, target or knob space, is
never applied: :func:`lookup` warns and returns ``None``, so a stale file costs speed, never correctness.

``TVM_PAGED_SCHEDULES_DIR`` overrides where the files are read from (default: the repository's top-level
``schedules/`` beside the package, else ``./schedules``). This module imports nothing of the tuner.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .kernels import knob_space as kernel_knob_space
from .targets import target_key

FORMAT = 1
SUFFIX = ".json"
SCRIPT_SUFFIX = ".tvmscript"


@dataclass(frozen=True)
class TunedSchedule:
    """Builder knobs chosen by tuning for one (config, target), and where they came from.

    ``bucket``: the tuned (batch, max_pages_per_seq) the knobs were measured on; ``gbps``: their K+V read rate.
    """

    knobs: dict = field(default_factory=dict)
    source: str = ""
    bucket: tuple[int, int] | None = None
    gbps: float | None = None


def schedules_dir() -> Path:
    """Where schedule files are read (and by default written): ``TVM_PAGED_SCHEDULES_DIR``, else the repository's
    top-level ``schedules/`` (found beside the package), else ``./schedules``."""
    env = os.environ.get("TVM_PAGED_SCHEDULES_DIR")
    if env:
        return Path(env)
    beside = Path(__file__).resolve().parent.parent / "schedules"
    if beside.is_dir():
        return beside
    return Path.cwd() / "schedules"


def schedule_path(cfg, target, root: Path | str | None = None) -> Path:
    """``<root>/<target_key>/<cfg.name>.json``."""

    return Path(root if root is not None else schedules_dir()) / target_key(target) / f"{cfg.name}{SUFFIX}"


def knob_space(cfg, target) -> dict[str, list]:
    """The kernel's tunable knobs on ``target`` (name -> candidate values, first = default); ``{}`` if none."""
    return {str(k): list(v) for k, v in kernel_knob_space(cfg, target).items()}


def same_value(a: Any, b: Any) -> bool:
    """Equal and of the same type (JSON keeps ``true`` and ``1`` apart; Python's ``True == 1`` does not)."""
    return type(a) is type(b) and a == b


def check_knobs(knobs: Any, space: dict[str, list]) -> dict:
    """``knobs`` if every name is in ``space`` and every value among its candidates, else ``ValueError``."""
    if not isinstance(knobs, dict):
        raise ValueError(f"knobs must be an object, got {type(knobs).__name__}")
    for name, value in knobs.items():
        if name not in space:
            raise ValueError(f"knob {name!r} is not in the kernel's knob space {sorted(space)}")
        if not any(same_value(value, v) for v in space[name]):
            raise ValueError(f"knob {name}={value!r} is not among its candidates {space[name]}")
    return dict(knobs)


def _positive_int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return value


def _validate(doc: Any, cfg, target, space: dict[str, list]) -> dict:
    """The parsed schedule ``doc`` if it belongs to (``cfg``, ``target``) and fits ``space``, else ``ValueError``."""

    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    if doc.get("format") != FORMAT:
        raise ValueError(f"format {doc.get('format')!r}, expected {FORMAT}")
    if doc.get("config") != cfg.name:
        raise ValueError(f"written for config {doc.get('config')!r}, not {cfg.name!r}")
    if doc.get("target_key") != target_key(target):
        raise ValueError(f"written for target {doc.get('target_key')!r}, not {target_key(target)!r}")
    check_knobs(doc.get("knobs"), space)
    buckets = doc.get("buckets")
    if not isinstance(buckets, list) or not buckets:
        raise ValueError("no buckets")
    for i, b in enumerate(buckets):
        if not isinstance(b, dict):
            raise ValueError(f"buckets[{i}] is not an object")
        _positive_int(b.get("batch"), f"buckets[{i}].batch")
        _positive_int(b.get("max_pages"), f"buckets[{i}].max_pages")
        check_knobs(b.get("knobs"), space)
        gbps = b.get("gbps")
        if gbps is not None and not (isinstance(gbps, (int, float)) and math.isfinite(gbps) and gbps > 0):
            raise ValueError(f"buckets[{i}].gbps must be a positive number, got {gbps!r}")
    return doc


def _nearest(buckets: list[dict], batch: int, max_pages: int) -> dict:
    """The bucket closest to (batch, max_pages) in log2 distance."""

    def dist(b):
        return (math.log2(b["batch"]) - math.log2(max(1, batch))) ** 2 + (
            math.log2(b["max_pages"]) - math.log2(max(1, max_pages))) ** 2

    return min(buckets, key=dist)


def knobs_for(doc: dict, batch: int | None = None, max_pages: int | None = None) -> dict:
    """Knobs of a validated schedule document: the nearest tuned bucket's, or the file's default knobs."""
    if batch is None or max_pages is None:
        return dict(doc["knobs"])
    return dict(_nearest(doc["buckets"], int(batch), int(max_pages))["knobs"])


def load(cfg, target, path: Path | str | None = None) -> dict | None:
    """The validated schedule document for (``cfg``, ``target``), ``None`` when there is none; a file that exists
    but is corrupt or foreign warns and gives ``None``."""
    path = Path(path) if path is not None else schedule_path(cfg, target)
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        space = knob_space(cfg, target)
        return _validate(doc, cfg, target, space)
    except Exception as exc:  # noqa: BLE001  (anything wrong with the file means: do not use it)
        warnings.warn(f"tvm_paged: ignoring schedule file {path}: {exc}; using the default schedule",
                      RuntimeWarning, stacklevel=3)
        return None


def lookup(cfg, target, batch: int | None = None, max_pages: int | None = None) -> TunedSchedule | None:
    """The committed schedule for (``cfg``, ``target``), or ``None`` to use the default schedule.

    With ``batch`` and ``max_pages`` the knobs of the nearest tuned bucket; without, the file's default knobs
    (those of its largest-traffic bucket).
    """
    path = schedule_path(cfg, target)
    doc = load(cfg, target, path)
    if doc is None:
        return None
    if batch is None or max_pages is None:
        knobs = doc["knobs"]
        chosen = next((b for b in doc["buckets"] if b["knobs"] == knobs), doc["buckets"][0])
    else:
        chosen = _nearest(doc["buckets"], int(batch), int(max_pages))
        knobs = chosen["knobs"]
    return TunedSchedule(knobs=dict(knobs), source=str(path), bucket=(chosen["batch"], chosen["max_pages"]),
                         gbps=chosen.get("gbps"))


def write(cfg, target, buckets: list[dict], *, root: Path | str | None = None, database: str = "",
          tvmscript: str | None = None) -> Path:
    """Write the schedule file (and the tuned PrimFunc's TVMScript beside it) for (``cfg``, ``target``).

    ``buckets``: ``{"batch", "max_pages", "knobs", "gbps", ...}`` per tuned bucket; the file's default knobs are
    those of the bucket with the most K+V traffic (batch x max_pages). Written to a temporary file then renamed.
    """

    if not buckets:
        raise ValueError("no tuned buckets to write")
    buckets = sorted(buckets, key=lambda b: (b["batch"] * b["max_pages"], b["max_pages"]), reverse=True)
    path = schedule_path(cfg, target, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "format": FORMAT,
        "config": cfg.name,
        "target_key": target_key(target),
        "target": json.loads(str(target)) if str(target).startswith("{") else str(target),
        "knobs": buckets[0]["knobs"],
        "buckets": buckets,
        "database": database,
        "tvmscript": path.with_suffix(SCRIPT_SUFFIX).name if tvmscript else None,
    }
    _write_text(path, json.dumps(doc, indent=1) + "\n")
    if tvmscript:
        _write_text(path.with_suffix(SCRIPT_SUFFIX), tvmscript)
    return path


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
