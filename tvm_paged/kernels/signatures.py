"""Buffer types of each kernel family's parameters, made from its :mod:`tvm_paged.spec` definition.

``args(spec, cfg)`` returns a namespace with one buffer type per tensor parameter (in the spec's order) and one
fresh symbolic int64 variable per symbolic dimension (two kernels never share one). A builder annotates its
``@T.prim_func`` parameters with them (``def decode(Q: a.q, K: a.k_cache, ...)``) and uses the dimensions in its
loops; ``decode_args(cfg)`` and the others are the same for one family.

Every tensor is aligned to its element size only: torch.from_numpy and sliced tensors are not 64-byte aligned.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

from .. import spec as S
from ..config import KernelConfig
from ..tvm_compat import T, keep_params, shape_var


def _dim(d: str, cfg: KernelConfig, dims: dict):
    total = None
    for term in d.split("+"):
        if term.isdigit():
            value = int(term)
        elif term in S.CONFIG_DIMS:
            value = getattr(cfg, S.CONFIG_DIMS[term])
        else:
            value = dims[term]
        total = value if total is None else total + value
    return total


def args(spec: S.KernelSpec, cfg: KernelConfig) -> SimpleNamespace:
    """Buffer types of ``spec``'s tensor parameters for ``cfg``, and its symbolic dimensions as variables.

    A parameter of a variant ``cfg`` does not have gets a one-element placeholder: builders declare every
    parameter of the family, use only those of their variants, and :func:`finish` drops the rest."""
    dims = {name: shape_var(name) for name in spec.dims}
    buffers = {}
    for p in spec.params:
        if p.is_tensor and not p.present(cfg):
            buffers[p.name] = T.Buffer((1,), "float32")
        elif p.is_tensor:
            shape = tuple(_dim(d, cfg, dims) for d in p.shape)
            buffers[p.name] = T.Buffer(shape, spec.dtype_of(p.name, cfg), align=spec.itemsize_of(p.name, cfg))
    return SimpleNamespace(**dims, **buffers)


def finish(spec: S.KernelSpec, cfg: KernelConfig, func):
    """A builder's PrimFunc, declared with every parameter of ``spec`` in order, reduced to those of ``cfg``'s
    kernel (its variants' arguments only)."""
    return keep_params(func, [p.present(cfg) for p in spec.params])


decode_args = functools.partial(args, S.DECODE)
prefill_args = functools.partial(args, S.PREFILL)
write_kv_args = functools.partial(args, S.WRITE_KV)
copy_pages_args = functools.partial(args, S.COPY_PAGES)
