"""Kernel builders: pure functions from a frozen :class:`~tvm_paged.config.KernelConfig` (and a target's
capabilities) to a TVMScript PrimFunc whose symbol is ``cfg.name``; their parameters are the family's
:mod:`tvm_paged.spec` definition.

One file per kernel family and target kind:
- ``decode_cpu``, ``prefill_cpu``, ``page_ops_cpu``: hand-scheduled loops for LLVM CPU targets.
- ``decode_cuda``, ``prefill_cuda``, ``page_ops_cuda``: thread-bound programs for CUDA targets.
- ``decode_generic``, ``prefill_blocks``: block-form programs for MetaSchedule's spaces (tuning only).
- ``common``: the vectorizable exp2, dtype conversions, shuffle sums and the shared online-softmax macros;
  ``signatures``: buffer types made from the specs.
"""

from __future__ import annotations

from typing import Callable

from ..config import KernelConfig
from ..targets import cpu_has_feature, cpu_vector_lanes, target_kind
from . import decode_cpu, decode_cuda, page_ops_cpu, page_ops_cuda, prefill_cpu, prefill_cuda


def _cpu(builder: Callable, space: Callable | None = None, features: Callable | None = None):
    """A CPU builder and knob space in the table's calling convention: tunable CPU kernels take the target's
    float32 SIMD lanes, and ``features(cfg, target)`` (when given) the other target facts they adapt to, as
    keyword arguments of both."""

    def facts(cfg, target):
        return features(cfg, target) if features is not None else {}

    def build(cfg, target, **knobs):
        if space is not None:
            knobs.setdefault("lanes", cpu_vector_lanes(target))
        for name, value in facts(cfg, target).items():
            knobs.setdefault(name, value)
        return builder(cfg, **knobs)

    def knobs(cfg, target):
        return space(cfg, cpu_vector_lanes(target), **facts(cfg, target))

    return build, (None if space is None else knobs)


def _prefill_features(cfg, target) -> dict:
    """Prefill runs its products on AMX tiles where the target has AMX-BF16 and the configuration is bfloat16."""
    return {"amx": prefill_cpu.amx_applies(cfg) and cpu_has_feature("amx-bf16", target)}


# (family, target kind) -> (builder(cfg, target, **knobs), knob_space(cfg, target) or None when nothing is tunable).
BUILDERS: dict[tuple[str, str], tuple[Callable, Callable | None]] = {
    ("decode", "cpu"): _cpu(decode_cpu.build_decode_cpu, decode_cpu.knob_space),
    ("prefill", "cpu"): _cpu(prefill_cpu.build_prefill_cpu, prefill_cpu.knob_space, _prefill_features),
    ("write_kv", "cpu"): _cpu(page_ops_cpu.build_write_kv_cpu),
    ("copy_pages", "cpu"): _cpu(page_ops_cpu.build_copy_pages_cpu),
    ("decode", "cuda"): (decode_cuda.build_decode_cuda, decode_cuda.knob_space),
    ("prefill", "cuda"): (prefill_cuda.build_prefill_cuda, prefill_cuda.knob_space),
    ("write_kv", "cuda"): (page_ops_cuda.build_write_kv_cuda, None),
    ("copy_pages", "cuda"): (page_ops_cuda.build_copy_pages_cuda, None),
}


def build_kernel(cfg: KernelConfig, target, **knobs):
    """The PrimFunc for ``cfg`` on ``target`` with its default (untuned) schedule; ``knobs`` override the
    builder's defaults (used by tuning)."""
    builder, _ = BUILDERS[(cfg.kernel, target_kind(target))]
    return builder(cfg, target, **knobs)


def knob_space(cfg: KernelConfig, target) -> dict[str, list]:
    """The tunable builder knobs of ``cfg``'s kernel on ``target`` and their candidate values (first = default).
    Every combination builds a correct kernel; only speed differs."""
    _, space = BUILDERS[(cfg.kernel, target_kind(target))]
    return {} if space is None else space(cfg, target)
