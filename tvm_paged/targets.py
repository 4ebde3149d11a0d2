"""Targets: the one place that spells them. Resolving a user's target (``local``, a tag, a JSON dict), its kind
(which kernel builders apply), its key (the folder name of schedules and logs), the local CPU and its features.

Nothing here compiles: the loader, the schedules and the tuner use it without the compile path (``build``).
"""

from __future__ import annotations

import functools
import json
import re
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

# ISA features that change what the kernels can use, by the tag a target key shows them with when a target's
# ``mattr`` adds them to (``+tag``) or removes them from (``+no<tag>``) what its ``mcpu`` implies. Other features
# (``pku``, ``rdpru``, ...) change nothing in these kernels and stay out of the key, so it stays short and stable.
KEY_FEATURES = {"avx2": "avx2", "fma": "fma", "avx512f": "avx512", "avx512fp16": "fp16", "avx512bf16": "bf16",
                "amx-tile": "amx", "neon": "neon", "fullfp16": "fp16", "bf16": "bf16", "dotprod": "dotprod",
                "i8mm": "i8mm", "sve": "sve", "prefer-256-bit": "ymm"}
# Removals shown by their effect rather than as "no<tag>".
_REMOVED_TAGS = {"prefer-256-bit": "zmm"}
# LLVM's tuning flag for Intel's AVX-512 cores (rocketlake, icelake, sapphirerapids: not the Zen 4/5 names): it
# legalizes 512-bit vectors as pairs of 256-bit ones, so the kernels' 16-lane float32 code (cpu_vector_lanes) ran
# mostly on ymm registers (decode float16 for rocketlake: 379 zmm and 903 ymm operands; without the flag 942 and
# 112). A local target on an AVX-512 host turns it off.
_SPLIT_512 = "prefer-256-bit"


def host_mattr(mcpu: str, host_features: dict[str, bool]) -> list[str]:
    """The ``mattr`` that makes an ``mcpu`` target match this machine: ``+f`` for each feature the host has and
    the CPU name lacks (LLVM names a Xeon with AVX512-FP16 and AMX ``rocketlake``, which has neither), ``-f`` for
    each one the name implies and the host lacks (a VM that hides AVX-512). Features the host list does not cover
    (LLVM's tuning flags) are left as the name sets them, except ``prefer-256-bit`` on an AVX-512 host (see
    ``_SPLIT_512``)."""
    implied = tc.cpu_features(tc.Target({"kind": "llvm", "mcpu": mcpu}))
    add = sorted(f for f, present in host_features.items() if present and f not in implied)
    drop = sorted(f for f, present in host_features.items() if not present and f in implied)
    if host_features.get("avx512f") and _SPLIT_512 in implied:
        drop.append(_SPLIT_512)
    return [f"+{f}" for f in add] + [f"-{f}" for f in drop]


@functools.lru_cache(maxsize=1)
def local_target() -> "tc.Target":
    """The CPU this process runs on: LLVM with the host's own ``mcpu``, the features the chip really has
    (:func:`host_mattr`) and the cores it may use (built once per process: asking LLVM for the host CPU and
    constructing the target cost about 0.15 ms, on every decode step)."""
    mcpu = tc.host_cpu()
    spec = {"kind": "llvm", "mcpu": mcpu, "num-cores": tc.allowed_cores(), **_LLVM_MATH_FLAGS}
    mattr = host_mattr(mcpu, tc.host_cpu_features())
    if mattr:
        spec["mattr"] = mattr
    return tc.Target(spec)


# Arm CPUs of edge boards and servers that TVM 0.27 has no tag for (its arm/* tags are older boards), by the tag
# this project gives them: LLVM's name for the core and its usual core count. All have NEON and fullfp16 (float16
# arithmetic; the kernels still accumulate in float32, as the peers do, and use it to widen); Neoverse-V1 adds SVE
# and BF16.
CPU_TAGS = {
    "arm/jetson-orin-cpu": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78", "num-cores": 6},
    "aws/graviton3": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-v1", "num-cores": 64},
    "raspberry-pi/5": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76", "num-cores": 4},
}


def resolve_target(spec: Any = None) -> "tc.Target":
    """``None``/``"local"`` -> :func:`local_target`; one of :data:`CPU_TAGS`; a TVM tag (``nvidia/nvidia-h100``);
    a JSON/dict target."""
    if spec is None or spec == "local":
        return local_target()
    if isinstance(spec, tc.Target):
        return spec
    if isinstance(spec, str) and spec.strip() in CPU_TAGS:
        spec = CPU_TAGS[spec.strip()]
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
            _check_llvm_triple(spec)
            spec.setdefault("num-cores", tc.allowed_cores())
            for key, value in _LLVM_MATH_FLAGS.items():
                spec.setdefault(key, value)
        try:
            return tc.Target(spec)
        except Exception as exc:
            raise ValueError(f"target: invalid target dict {spec!r} ({exc})") from exc
    raise ValueError(f"target: expected a tag, a JSON/dict target or 'local', got {type(spec).__name__}")


def _check_llvm_triple(spec: dict) -> None:
    """An ``mtriple`` whose architecture LLVM lacks crashes the code generator (a segfault, not an error), and an
    ``mcpu`` LLVM does not know builds for a generic CPU after a page of warnings: refuse both by name."""
    triple = str(spec.get("mtriple") or tc.host_triple())
    arch = _llvm_arch(triple.split("-")[0])
    if arch not in tc.llvm_arches():
        raise ValueError(f"target: mtriple {triple!r}: LLVM here has no {arch!r} target (it has "
                         f"{', '.join(sorted(tc.llvm_arches()))})")
    mcpu = spec.get("mcpu")
    if mcpu and not tc.llvm_knows_cpu(str(mcpu), triple):
        raise ValueError(f"target: mcpu {mcpu!r} is not a CPU LLVM knows for {triple!r}")


def _llvm_arch(arch: str) -> str:
    """A triple's architecture as LLVM names its target: sub-architectures (armv7a, thumbv8m, i686) and aliases
    (arm64, amd64) to their family."""
    arch = {"arm64": "aarch64", "arm64e": "aarch64", "amd64": "x86_64"}.get(arch, arch)
    if re.fullmatch(r"i[3-6]86", arch):
        return "i386"
    return next((family for family in ("armeb", "arm", "thumbeb", "thumb") if arch.startswith(family)), arch)


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
    """A short, stable, filesystem-safe name for a target: ``llvm-znver3-2c``, ``llvm-aarch64-cortex-a78-6c``,
    ``cuda-sm_90a``; a CPU whose ``mattr`` changes a :data:`KEY_FEATURES` feature shows it after the CPU name,
    sorted (``llvm-rocketlake+amx+bf16+fp16-2c``)."""
    kind = target_kind(target)
    if kind == "cpu":
        attrs = target.attrs
        mcpu = str(attrs.get("mcpu", "generic")) + "".join(_feature_tags(attrs.get("mattr") or ()))
        triple = str(attrs.get("mtriple", "")).split("-")[0]
        return "-".join(p for p in ("llvm", triple, mcpu, f"{int(attrs.get('num-cores', 1))}c") if p)
    return f"cuda-{target.attrs.get('arch', 'unknown')}"


def _feature_tags(mattr) -> list[str]:
    tags = set()
    for entry in (str(m) for m in mattr):
        sign, name = entry[:1], entry[1:]
        tag = KEY_FEATURES.get(name)
        if tag and sign == "+":
            tags.add(f"+{tag}")
        elif tag and sign == "-":
            tags.add(f"+{_REMOVED_TAGS.get(name, 'no' + tag)}")
    return sorted(tags)


def cpu_has_feature(feature: str, target: "tc.Target") -> bool:
    """Whether the CPU target may use LLVM feature ``feature`` (its CPU name's features with ``mattr`` applied)."""
    return bool(tc.cpu_has_feature(feature, target))


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
