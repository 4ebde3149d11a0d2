"""Compilation and the kernel caches: the only place that turns a config into a callable.

Data flow: ``KernelConfig`` -> kernel builder (``tvm_paged.kernels``) with the tuned knobs (``tuned_knobs``) ->
PrimFunc -> ``tvm.compile`` -> function, cached in memory per (config, target) and on disk as a shared library so
a second process does not recompile. Targets are resolved by ``tvm_paged.targets``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

from . import tuned_knobs
from . import tvm_compat as tc
from .config import KernelConfig
from .kernels import build_kernel
from .targets import resolve_target, target_kind, target_key, with_host


def cache_dir() -> Path:
    """On-disk compile cache: ``<TVM_PAGED_CACHE_DIR or the user's tvm_paged folder>/tvm-<version>`` (see
    :func:`tvm_paged.tuned_knobs.user_root`: ``~/.cache/tvm_paged`` by default)."""
    root = os.environ.get("TVM_PAGED_CACHE_DIR") or tuned_knobs.user_root()
    return Path(root) / f"tvm-{tc.TVM_VERSION}"


_MEMORY: dict[tuple, Callable] = {}
_LOCK = threading.Lock()
# (config, target as given, batch, max_pages) -> the kernel get_kernel returned for it.
_FAST: dict[tuple, Callable] = {}
_FAST_LIMIT = 4096


def tuned_prim_func(cfg: KernelConfig, target: "tc.Target"):
    """The PrimFunc for ``cfg`` on ``target`` built with the committed tuned knobs when
    ``schedules/<target_key>/<cfg.name>.json`` holds some, else with the builder's defaults."""
    tuned = tuned_knobs.lookup(cfg, target)
    return build_kernel(cfg, target, **(tuned.knobs if tuned else {}))


def compile_kernel(cfg: KernelConfig, target: "tc.Target", knobs: dict | None = None):
    """Compile one kernel; returns TVM's executable (``.mod`` is the runtime module, ``.mod[cfg.name]`` the
    function). ``knobs=None``: the committed tuned schedule if any, else the default; a dict: exactly those
    builder knobs (``{}`` = the default schedule)."""
    if knobs is None:
        func = tuned_prim_func(cfg, target)
    else:
        func = build_kernel(cfg, target, **knobs)
    target = with_host(target)
    with target:
        return tc.compile_module(func, target)


def _fingerprint(func, target: "tc.Target") -> str:
    h = hashlib.sha256()
    h.update(func.script().encode())
    h.update(str(target).encode())
    h.update(f"{tc.TVM_VERSION}/{tc.FFI_VERSION}".encode())
    return h.hexdigest()[:16]


def get_kernel(cfg: KernelConfig, target: Any = None, *, batch: int | None = None,
               max_pages: int | None = None) -> Callable:
    """A callable for ``cfg`` on ``target`` (default: the local CPU), compiled at most once per process and,
    for CPU targets, loaded from the on-disk cache when another process already built it.

    With ``batch`` and ``max_pages`` (the batch's widest page table), the knobs tuned for the nearest bucket
    in ``schedules/``; without, the schedule file's default knobs; with no schedule file, the default schedule.
    """
    # Every attention call lands here: answer a repeated (config, target, shape) from a dict before resolving
    # the target, printing it and finding the nearest bucket (about 0.1 ms together).
    fast_key = (cfg, target if isinstance(target, (str, tc.Target)) or target is None else json.dumps(
        target, sort_keys=True), batch, max_pages)
    fn = _FAST.get(fast_key)
    if fn is not None:
        return fn
    target = resolve_target(target)
    knobs = _tuned_knobs(cfg, target, batch, max_pages)
    key = (cfg.name, str(target), tuple(sorted(knobs.items())))
    fn = _MEMORY.get(key)
    if fn is None:
        with _LOCK:
            fn = _MEMORY.get(key)
            if fn is None:
                fn = _load_or_compile(cfg, target, knobs)
                _MEMORY[key] = fn
    if len(_FAST) >= _FAST_LIMIT:  # batch and max_pages vary freely in serving: bound the table
        _FAST.clear()
    _FAST[fast_key] = fn
    return fn


# (config name, target) -> the validated schedule document, or None: read once per process, not per call.
_SCHEDULES: dict[tuple[str, str], dict | None] = {}


def _tuned_knobs(cfg: KernelConfig, target: "tc.Target", batch, max_pages) -> dict:
    key = (cfg.name, str(target))
    if key not in _SCHEDULES:
        _SCHEDULES[key] = tuned_knobs.load(cfg, target)
    doc = _SCHEDULES[key]
    return {} if doc is None else tuned_knobs.knobs_for(doc, batch, max_pages)


def _load_or_compile(cfg: KernelConfig, target: "tc.Target", knobs: dict) -> Callable:
    if target_kind(target) != "cpu" or os.environ.get("TVM_PAGED_NO_DISK_CACHE"):
        return compile_kernel(cfg, target, knobs=knobs).mod[cfg.name]
    func = build_kernel(cfg, target, **knobs)
    path = cache_dir() / target_key(target) / f"{cfg.name}-{_fingerprint(func, target)}.so"
    if path.exists():
        try:
            return tc.load_module(str(path))[cfg.name]
        except Exception:  # a truncated or foreign file: rebuild below
            path.unlink(missing_ok=True)
    with target:
        ex = tc.compile_module(func, target)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: a concurrent process never loads a half-written library.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        ex.export_library(tmp)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache still leaves a working in-memory kernel
    return ex.mod[cfg.name]


def clear_memory_cache() -> None:
    """Forget compiled kernels and schedule files read in this process (e.g. after schedules/ changed)."""
    _MEMORY.clear()
    _SCHEDULES.clear()
    _FAST.clear()
