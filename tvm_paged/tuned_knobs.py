"""Committed tuned schedules: where the build looks for something better than the default.

A schedule file ``schedules/<target_key>/<config name>.json`` is data written by ``tvm-paged tune``: for each tuned
workload bucket (batch x max pages per sequence) the builder knobs that measured fastest, their GB/s of K+V read
and the untuned default's. With no file for a (config, target), :func:`lookup` returns ``None`` and the kernel is
built with its default knobs. A file that is corrupt, or written for another config, target or knob space, is
never applied: :func:`lookup` warns and returns ``None``, so a stale file costs speed, never correctness.

**Variants fall back to their plain configuration's file.** A configuration with attention variants or an 8-bit
cache (``decode_e5m2_f16_h32x8_d128_p16_w``) uses its own file when it has one; with none, it uses the file of its
plain configuration (same dtype, heads, head_dim and page size, caches in the dtype of q, no variant:
:func:`plain_config`), since a variant's kernel is the same builder with the same knob space. Only the buckets
whose knobs are also valid in the variant's own knob space are used (on CPU targets all are; a CUDA plan that
depends on the cache's element size may differ), and :attr:`TunedSchedule.config` names the file's configuration.
``tvm-paged tune --kv-dtype ... --variants ...`` writes a variant's own file.

**Where the files are.** Lookups search, in order: the user's own schedules (:func:`user_dir`:
``TVM_PAGED_SCHEDULES_DIR``, else ``$XDG_CACHE_HOME/tvm_paged/schedules``, by default
``~/.cache/tvm_paged/schedules``), then the schedules shipped with the package (:func:`packaged_dir`: the
project's ``schedules/`` folder, installed as ``tvm_paged/_schedules`` in a wheel). A configuration's own file is
looked for in every folder before its plain configuration's. ``tvm-paged tune`` writes to the user's folder unless
told otherwise (``--schedules-dir schedules/`` to add a schedule to the project). This module imports nothing of
the tuner.
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

    ``bucket``: the tuned (batch, max_pages_per_seq) the knobs were measured on; ``gbps``: their K+V read rate;
    ``config``: the name of the configuration they were tuned for (the plain configuration's when a variant fell
    back to its file, see the module docstring).
    """

    knobs: dict = field(default_factory=dict)
    source: str = ""
    bucket: tuple[int, int] | None = None
    gbps: float | None = None
    config: str = ""


def user_root() -> Path:
    """This user's tvm_paged folder: ``$XDG_CACHE_HOME/tvm_paged``, by default ``~/.cache/tvm_paged`` (tuned
    schedules, tuning logs)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tvm_paged"


def user_dir() -> Path:
    """The user's own schedules, searched first and written by ``tvm-paged tune``: ``TVM_PAGED_SCHEDULES_DIR``,
    else ``<user_root>/schedules``."""
    env = os.environ.get("TVM_PAGED_SCHEDULES_DIR")
    return Path(env) if env else user_root() / "schedules"


def packaged_dir() -> Path | None:
    """The schedules that ship with tvm_paged: ``tvm_paged/_schedules`` in an installed wheel, the project's
    ``schedules/`` beside the package in a source checkout (or an editable install); None when neither exists."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_schedules", here.parent / "schedules"):
        if candidate.is_dir():
            return candidate
    return None


def search_dirs() -> list[Path]:
    """Where :func:`lookup` looks, first match wins: :func:`user_dir`, then :func:`packaged_dir`."""
    dirs = [user_dir()]
    shipped = packaged_dir()
    if shipped is not None and shipped.resolve() != dirs[0].resolve():
        dirs.append(shipped)
    return dirs


def schedule_path(cfg, target, root: Path | str | None = None) -> Path:
    """``<root>/<target_key>/<cfg.name>.json``; ``root`` defaults to :func:`user_dir` (where a tune writes)."""

    return Path(root if root is not None else user_dir()) / target_key(target) / f"{cfg.name}{SUFFIX}"


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


def plain_config(cfg):
    """The configuration whose schedule file ``cfg`` falls back to when it has none of its own: the same kernel,
    dtype, heads, head_dim and page size, caches in the dtype of q, no attention variant. ``None`` when ``cfg`` is
    itself plain (or a ``copy_pages`` of 8-bit caches, whose dtype is the cache's)."""
    if cfg.is_plain or cfg.kernel == "copy_pages":
        return None
    return cfg.with_variants(kv_dtype=cfg.dtype, window=False, soft_cap=False, alibi=False, sinks=False)


def _read(cfg, target, path: Path, space: dict[str, list]) -> dict | None:
    """The schedule document at ``path`` validated for (``cfg``, ``target``) and ``space``; ``None`` when there is no
    file, a warning and ``None`` when the file is corrupt or foreign."""
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        return _validate(doc, cfg, target, space)
    except Exception as exc:  # noqa: BLE001  (anything wrong with the file means: do not use it)
        warnings.warn(f"tvm_paged: ignoring schedule file {path}: {exc}; using the default schedule",
                      RuntimeWarning, stacklevel=4)
        return None


def _fits(knobs: dict, space: dict[str, list]) -> bool:
    try:
        check_knobs(knobs, space)
    except ValueError:
        return False
    return True


def _find(cfg, target, path: Path | str | None = None) -> tuple[dict | None, Path | None]:
    """(validated document, its path) for ``cfg``: ``path`` when given; else its own file in the first folder of
    :func:`search_dirs` that has a valid one, else its plain configuration's, restricted to the buckets whose knobs
    fit ``cfg``'s knob space. A corrupt or foreign file warns and the search goes on."""
    space = knob_space(cfg, target)
    if path is not None:
        return _read(cfg, target, Path(path), space), Path(path)
    dirs = search_dirs()
    for root in dirs:
        own = schedule_path(cfg, target, root)
        doc = _read(cfg, target, own, space)
        if doc is not None:
            return doc, own
    plain = plain_config(cfg)
    if plain is None:
        return None, None
    plain_space = knob_space(plain, target)
    for root in dirs:
        fallback = schedule_path(plain, target, root)
        doc = _read(plain, target, fallback, plain_space)
        if doc is None:
            continue
        buckets = [b for b in doc["buckets"] if _fits(b["knobs"], space)]
        if not buckets:  # the plain knobs do not apply to this variant (another knob space): the default schedule
            return None, fallback
        knobs = doc["knobs"] if _fits(doc["knobs"], space) else buckets[0]["knobs"]
        return {**doc, "knobs": knobs, "buckets": buckets}, fallback
    return None, None


def load(cfg, target, path: Path | str | None = None) -> dict | None:
    """The validated schedule document for (``cfg``, ``target``), ``None`` when there is none; a file that exists
    but is corrupt or foreign warns and gives ``None``. Without ``path``, a variant configuration with no file of
    its own gets its plain configuration's (see :func:`plain_config`); the document's ``config`` then names it."""
    return _find(cfg, target, path)[0]


def lookup(cfg, target, batch: int | None = None, max_pages: int | None = None) -> TunedSchedule | None:
    """The committed schedule for (``cfg``, ``target``), or ``None`` to use the default schedule.

    With ``batch`` and ``max_pages`` the knobs of the nearest tuned bucket; without, the file's default knobs
    (those of its largest-traffic bucket). A variant with no file of its own uses its plain configuration's
    (``TunedSchedule.config`` then names that configuration).
    """
    doc, path = _find(cfg, target)
    if doc is None:
        return None
    if batch is None or max_pages is None:
        knobs = doc["knobs"]
        chosen = next((b for b in doc["buckets"] if b["knobs"] == knobs), doc["buckets"][0])
    else:
        chosen = _nearest(doc["buckets"], int(batch), int(max_pages))
        knobs = chosen["knobs"]
    return TunedSchedule(knobs=dict(knobs), source=str(path), bucket=(chosen["batch"], chosen["max_pages"]),
                         gbps=chosen.get("gbps"), config=str(doc["config"]))


def describe(cfg, target) -> str:
    """One line for a summary: which schedule ``cfg``'s kernel gets on ``target`` (the file it comes from), or that
    it runs its default knobs and the command that tunes it for this CPU kind."""
    doc, path = _find(cfg, target)
    key = target_key(target)
    if doc is not None:
        shown = path.resolve()
        if shown.is_relative_to(Path.cwd()):  # a checkout's own schedules/, as the user would type it
            shown = shown.relative_to(Path.cwd())
        return f"{cfg.name} tuned for {key} ({shown})"
    return (f"{cfg.name}: no tuned schedule for {key}, default knobs (tune it here: tvm-paged tune --target local "
            f"--kernel {cfg.kernel} --dtype {cfg.dtype} --num-qo-heads {cfg.num_qo_heads} --num-kv-heads "
            f"{cfg.num_kv_heads} --head-dim {cfg.head_dim} --page-size {cfg.page_size})")


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
    write_text(path, json.dumps(doc, indent=1) + "\n")
    if tvmscript:
        write_text(path.with_suffix(SCRIPT_SUFFIX), tvmscript)
    return path


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
