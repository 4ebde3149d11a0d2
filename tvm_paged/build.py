"""Targets, compilation and the kernel caches: the only place that turns a config into a callable.

Data flow: ``KernelConfig`` -> kernel builder (``tvm_paged.kernels``) -> PrimFunc -> optional tuned schedule
-> ``tvm.compile`` -> function, cached in memory per (config, target) and on disk as a shared library so a
second process does not recompile. Target spelling lives here and nowhere else.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

from . import tvm_compat as tc
from .config import KernelConfig

# Fast-math without "no NaNs / no infinities": reassociation lets LLVM vectorize the head_dim reductions,
# while -inf (the online softmax's start value, empty splits) keeps its meaning. The full "fast-math" flag
# would let LLVM assume no infinities, which breaks exactly the cases the tests check.
_LLVM_MATH_FLAGS = {
    "fast-math-reassoc": True,
    "fast-math-contract": True,
    "fast-math-nsz": True,
    "fast-math-arcp": True,
}

TargetSpec = "str | dict | tc.Target | None"


@functools.lru_cache(maxsize=1)
def local_target() -> "tc.Target":
    """The CPU this process runs on: LLVM with the host's own ``mcpu`` and the cores it may use (built once per
    process: asking LLVM for the host CPU and constructing the target cost about 0.15 ms, on every decode step)."""
    return tc.Target({"kind": "llvm", "mcpu": tc.host_cpu(), "num-cores": tc.allowed_cores(), **_LLVM_MATH_FLAGS})


def resolve_target(spec: Any = None) -> "tc.Target":
    """``None``/``"local"`` -> :func:`local_target`; a TVM tag (``nvidia/nvidia-h100``); a JSON/dict target."""
    if spec is None or spec == "local":
        return local_target()
    if isinstance(spec, tc.Target):
        return spec
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith("{"):
            try:
                spec = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"target: not valid JSON: {exc}") from exc
        else:
            try:
                target = tc.Target(text)
            except Exception as exc:  # TVM raises its own error types
                raise ValueError(f"target: unknown target or tag {text!r} ({exc})") from exc
            return _fix_host(text, target)
    if isinstance(spec, dict):
        spec = dict(spec)
        if spec.get("kind") == "llvm":
            spec.setdefault("num-cores", tc.allowed_cores())
            for key, value in _LLVM_MATH_FLAGS.items():
                spec.setdefault(key, value)
        try:
            return tc.Target(spec)
        except Exception as exc:
            raise ValueError(f"target: invalid target dict {spec!r} ({exc})") from exc
    raise ValueError(f"target: expected a tag, a JSON/dict target or 'local', got {type(spec).__name__}")


def _fix_host(tag: str, target: "tc.Target") -> "tc.Target":
    """TVM 0.27's Jetson Orin tags give the host ``mcpu=carmel`` (Xavier's CPU); Orin's is a Cortex-A78AE."""
    host = target.host
    if "orin" in tag and host is not None and str(host.attrs.get("mcpu", "")) == "carmel":
        fixed = {"kind": "llvm", "mtriple": str(host.attrs["mtriple"]), "mcpu": "cortex-a78",
                 "num-cores": int(host.attrs.get("num-cores", 6))}
        return tc.Target(target, tc.Target(fixed))
    return target


def target_kind(target: "tc.Target") -> str:
    """``"cpu"`` or ``"cuda"``: which family of kernel builders applies."""
    name = target.kind.name
    if name == "llvm":
        return "cpu"
    if name == "cuda":
        return "cuda"
    raise ValueError(f"target: kind {name!r} is not supported (llvm or cuda)")


def target_key(target: "tc.Target") -> str:
    """A short, stable, filesystem-safe name for a target (``llvm-znver3-2c``, ``cuda-sm_90a``)."""
    kind = target_kind(target)
    if kind == "cpu":
        attrs = target.attrs
        mcpu = str(attrs.get("mcpu", "generic"))
        triple = str(attrs.get("mtriple", "")).split("-")[0]
        return "-".join(p for p in ("llvm", triple, mcpu, f"{int(attrs.get('num-cores', 1))}c") if p)
    return f"cuda-{target.attrs.get('arch', 'unknown')}"


def cpu_vector_lanes(target: "tc.Target") -> int:
    """float32 lanes of the widest SIMD unit the CPU target may use (16 for AVX-512, 8 for AVX2, 4 otherwise)."""
    for feature, lanes in (("avx512f", 16), ("avx2", 8)):
        if tc.cpu_has_feature(feature, target):
            return lanes
    return 4


def with_host(target: "tc.Target") -> "tc.Target":
    """A CUDA target with a host: the tag's own host, else this CPU."""
    if target_kind(target) != "cuda" or target.host is not None:
        return target
    return tc.Target(target, local_target())


# --------------------------------------------------------------------------------------------- caches
def cache_dir() -> Path:
    """On-disk compile cache; ``TVM_PAGED_CACHE_DIR`` overrides ``~/.cache/tvm_paged``."""
    root = os.environ.get("TVM_PAGED_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tvm_paged")
    return Path(root) / f"tvm-{tc.TVM_VERSION}"


_MEMORY: dict[tuple, Callable] = {}
_LOCK = threading.Lock()
# (config, target as given, batch, max_pages) -> the kernel get_kernel returned for it.
_FAST: dict[tuple, Callable] = {}
_FAST_LIMIT = 4096


def prim_func(cfg: KernelConfig, target: "tc.Target"):
    """The PrimFunc for ``cfg`` on ``target``: built with the committed tuned knobs when
    ``schedules/<target_key>/<cfg.name>.json`` holds some, else with the builder's defaults."""
    from . import schedules  # noqa: PLC0415
    from .kernels import build_kernel  # noqa: PLC0415

    tuned = schedules.lookup(cfg, target)
    return build_kernel(cfg, target, **(tuned.knobs if tuned else {}))


def compile_kernel(cfg: KernelConfig, target: "tc.Target", knobs: dict | None = None):
    """Compile one kernel; returns TVM's executable (``.mod`` is the runtime module, ``.mod[cfg.name]`` the
    function). ``knobs=None``: the committed tuned schedule if any, else the default; a dict: exactly those
    builder knobs (``{}`` = the default schedule)."""
    if knobs is None:
        func = prim_func(cfg, target)
    else:
        from .kernels import build_kernel  # noqa: PLC0415

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
    from . import schedules  # noqa: PLC0415

    key = (cfg.name, str(target))
    if key not in _SCHEDULES:
        _SCHEDULES[key] = schedules.load(cfg, target)
    doc = _SCHEDULES[key]
    return {} if doc is None else schedules.knobs_for(doc, batch, max_pages)


def _load_or_compile(cfg: KernelConfig, target: "tc.Target", knobs: dict) -> Callable:
    from .kernels import build_kernel  # noqa: PLC0415

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


@functools.lru_cache(maxsize=64)
def target_for_device(device) -> Any:
    """The target that runs on a torch device: the local CPU, or the CUDA GPU's own architecture (one object per
    device, so :func:`get_kernel`'s per-call lookup finds it)."""
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        import torch  # noqa: PLC0415

        major, minor = torch.cuda.get_device_capability(device)
        arch = f"sm_{major}{minor}" + ("a" if major >= 9 else "")
        return tc.Target({"kind": "cuda", "arch": arch, "max_num_threads": 1024, "thread_warp_size": 32})
    raise ValueError(f"device: {device} is not supported (cpu or cuda)")
