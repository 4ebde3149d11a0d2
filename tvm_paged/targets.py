"""Targets: the one place that spells them. Resolving a user's target (``local``, a tag, a JSON dict), its kind
(which kernel builders apply), its key (the folder name of schedules and logs), the local CPU and its features.

Nothing here compiles: the loader, the schedules and the tuner use it without the compile path (``build``).
"""

from __future__ import annotations

import functools
import json
from typing import Any

from . import tvm_compat as tc

# Fast-math without "no NaNs / no infinities": reassociation lets LLVM vectorize the head_dim reductions,
# while -inf (the online softmax's start value, empty splits) keeps its meaning. The full "fast-math" flag
# would let LLVM assume no infinities, which breaks exactly the cases the tests check.
_LLVM_MATH_FLAGS = {
    "fast-math-reassoc": True,
    "fast-math-contract": True,
    "fast-math-nsz": True,
    "fast-math-arcp": True,
}

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


@functools.lru_cache(maxsize=64)
def target_for_device(device) -> Any:
    """The target that runs on a torch device: the local CPU, or the CUDA GPU's own architecture (one object per
    device, so :func:`get_kernel`'s per-call lookup finds it)."""
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        import torch  # noqa: PLC0415  (optional on a device: only CUDA tensors need it)

        major, minor = torch.cuda.get_device_capability(device)
        arch = f"sm_{major}{minor}" + ("a" if major >= 9 else "")
        return tc.Target({"kind": "cuda", "arch": arch, "max_num_threads": 1024, "thread_warp_size": 32})
    raise ValueError(f"device: {device} is not supported (cpu or cuda)")
