"""Kernel builders: pure functions from a frozen :class:`~tvm_paged.config.KernelConfig` (and a target's
capabilities) to a TVMScript PrimFunc whose symbol is ``cfg.name``.

One file per kernel family and target kind:
- ``decode_cpu``, ``prefill_cpu``, ``page_ops_cpu``: hand-scheduled loops for LLVM CPU targets.
- ``decode_cuda``, ``prefill_cuda``, ``page_ops_cuda``: thread-bound programs for CUDA targets.
- ``common``: the vectorizable exp2 and dtype helpers.
"""

from __future__ import annotations

from ..config import KernelConfig


def build_kernel(cfg: KernelConfig, target, **knobs):
    """The PrimFunc for ``cfg`` on ``target`` with its default (untuned) schedule; ``knobs`` override the
    builder's defaults (used by tuning)."""
    from ..build import cpu_vector_lanes, target_kind  # noqa: PLC0415

    kind = target_kind(target)
    if kind == "cpu":
        if cfg.kernel == "decode":
            from .decode_cpu import build_decode_cpu  # noqa: PLC0415

            knobs.setdefault("lanes", cpu_vector_lanes(target))
            return build_decode_cpu(cfg, **knobs)
        if cfg.kernel == "prefill":
            from .prefill_cpu import build_prefill_cpu  # noqa: PLC0415

            knobs.setdefault("lanes", cpu_vector_lanes(target))
            return build_prefill_cpu(cfg, **knobs)
        from .page_ops_cpu import build_copy_pages_cpu, build_write_kv_cpu  # noqa: PLC0415

        return build_write_kv_cpu(cfg) if cfg.kernel == "write_kv" else build_copy_pages_cpu(cfg)
    if cfg.kernel == "decode":
        from .decode_cuda import build_decode_cuda  # noqa: PLC0415

        return build_decode_cuda(cfg, target, **knobs)
    if cfg.kernel == "prefill":
        from .prefill_cuda import build_prefill_cuda  # noqa: PLC0415

        return build_prefill_cuda(cfg, target, **knobs)
    from .page_ops_cuda import build_copy_pages_cuda, build_write_kv_cuda  # noqa: PLC0415

    return build_write_kv_cuda(cfg, target) if cfg.kernel == "write_kv" else build_copy_pages_cuda(cfg, target)


def knob_space(cfg: KernelConfig, target) -> dict[str, list]:
    """The tunable builder knobs of ``cfg``'s kernel on ``target`` and their candidate values (first = default).
    Every combination builds a correct kernel; only speed differs."""
    from ..build import cpu_vector_lanes, target_kind  # noqa: PLC0415

    kind = target_kind(target)
    if kind == "cpu" and cfg.kernel == "decode":
        from .decode_cpu import knob_space as space  # noqa: PLC0415

        return space(cfg, cpu_vector_lanes(target))
    if kind == "cpu" and cfg.kernel == "prefill":
        from .prefill_cpu import knob_space as space  # noqa: PLC0415

        return space(cfg, cpu_vector_lanes(target))
    if kind == "cuda" and cfg.kernel == "decode":
        from .decode_cuda import knob_space as space  # noqa: PLC0415

        return space(cfg, target)
    if kind == "cuda" and cfg.kernel == "prefill":
        from .prefill_cuda import knob_space as space  # noqa: PLC0415

        return space(cfg, target)
    return {}
