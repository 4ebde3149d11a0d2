"""One definition per kernel family: its parameters (name, shape, dtype, role), its planning constants, and the
binding of a call's values to the compiled function's argument list.

The functional API (``ops``), the export manifest and the loader's checks, the tuner's argument maker and the
kernels' buffer types (``kernels/signatures.py``) all read these definitions, so adding a kernel argument is a
change here plus the builder bodies that use it. Pure Python: nothing here imports TVM or torch, so the loader,
the allocator's callers and the tuner's worker processes can all read it.

Shapes are tuples of dimension names. Upper-case names are the kernel's symbolic dimensions (``B`` batch, ``P``
pages in the pool, ...), fixed per call; ``Hq``, ``Hkv``, ``D``, ``S`` are the configuration's ``num_qo_heads``,
``num_kv_heads``, ``head_dim`` and ``page_size``; ``"B+1"`` is one more than ``B``. A dtype of ``"cfg"`` means the
configuration's storage dtype.

Roles:
- ``input``: read only;
- ``inplace``: read and written in place (the caches of ``write_kv`` and ``copy_pages``);
- ``output``: written;
- ``scratch``: written and read by the kernel itself, owned by a plan's workspace and reused across calls;
- ``scalar``: a number passed by value.
Every ``inplace`` and ``output`` tensor must be writable and may not share memory with any other argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

ROLES = ("input", "inplace", "output", "scratch", "scalar")
# The configuration's constant dimensions, by the attribute of KernelConfig that holds them.
CONFIG_DIMS = {"Hq": "num_qo_heads", "Hkv": "num_kv_heads", "D": "head_dim", "S": "page_size"}
_ITEMSIZE = {"int32": 4, "int64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Param:
    """One argument of a kernel family. ``shape``: dimension names (see the module docstring); ``dtype``: a
    dtype name or ``"cfg"``."""

    name: str
    role: str
    shape: tuple[str, ...] = ()
    dtype: str = "cfg"
    doc: str = ""

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"param {self.name}: role {self.role!r} is not one of {ROLES}")

    @property
    def is_tensor(self) -> bool:
        return self.role != "scalar"


@dataclass(frozen=True, eq=False)
class KernelSpec:
    """A kernel family's calling convention: parameters in argument order, the meaning of its symbolic dimensions
    and its planning constants (``constants["q_tile"]``: query rows per prefill task)."""

    family: str
    params: tuple[Param, ...]
    dims: Mapping[str, str]
    constants: Mapping[str, Any] = field(default_factory=dict)
    doc: str = ""

    def __post_init__(self):
        # Derived once: every call of the API reads these.
        object.__setattr__(self, "names", tuple(p.name for p in self.params))
        object.__setattr__(self, "tensor_names", tuple(p.name for p in self.params if p.is_tensor))
        object.__setattr__(self, "_by_name", {p.name: p for p in self.params})
        for p in self.params:
            for d in p.shape:
                for term in d.split("+"):
                    if not (term in self.dims or term in CONFIG_DIMS or term.isdigit()):
                        raise ValueError(f"{self.family}.{p.name}: unknown dimension {term!r}")

    names: tuple[str, ...] = field(init=False, repr=False, compare=False)
    tensor_names: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _by_name: dict = field(init=False, repr=False, compare=False)

    def with_role(self, *roles: str) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.role in roles)

    def dtype_of(self, name: str, cfg) -> str:
        dtype = self._by_name[name].dtype
        return cfg.dtype if dtype == "cfg" else dtype

    def itemsize_of(self, name: str, cfg) -> int:
        return _ITEMSIZE[self.dtype_of(name, cfg)]

    def shape_of(self, name: str, cfg, dims: Mapping[str, int]) -> tuple[int, ...]:
        """The concrete shape of a tensor parameter for ``cfg`` and the symbolic dimensions' values ``dims``."""
        return tuple(_eval_dim(d, cfg, dims) for d in self._by_name[name].shape)

    def signature(self, cfg) -> list[dict]:
        """The parameters as the export manifest records them: name, role, dtype and shape (configuration
        dimensions as numbers, symbolic ones by name)."""
        out = []
        for p in self.params:
            entry = {"name": p.name, "role": p.role, "dtype": self.dtype_of(p.name, cfg)}
            if p.is_tensor:
                entry["shape"] = [_config_dim(d, cfg) for d in p.shape]
            out.append(entry)
        return out

    def binder(self, fixed: Mapping[str, Any]) -> "Binder":
        """A :class:`Binder` with ``fixed`` (typically the plan's tables and workspace scratch) bound."""
        return Binder(self, fixed)


class Binder:
    """Orders a call's arguments: the fixed values given once (a plan's page table, lengths and scratch), the
    rest per call by name. ``binder(q=q, out=out, ...)`` returns the positional argument list."""

    __slots__ = ("_template", "_slots", "spec")
    # (spec, names fixed) -> the positions of the names given per call: a plan per step binds the same names.
    _SLOTS: dict = {}

    def __init__(self, spec: KernelSpec, fixed: Mapping[str, Any]):
        key = (id(spec), tuple(fixed))
        slots = Binder._SLOTS.get(key)
        if slots is None:
            unknown = set(fixed) - set(spec.names)
            if unknown:
                raise ValueError(f"{spec.family}: no parameters named {sorted(unknown)}")
            slots = Binder._SLOTS[key] = tuple((i, n) for i, n in enumerate(spec.names) if n not in fixed)
        self.spec = spec
        self._template = [fixed.get(n) for n in spec.names]
        self._slots = slots

    def __call__(self, **values) -> list:
        args = list(self._template)
        try:
            for i, n in self._slots:
                args[i] = values[n]
        except KeyError as exc:
            raise ValueError(f"{self.spec.family}: no value for argument {exc.args[0]!r}") from None
        return args


def _config_dim(d: str, cfg):
    if d in CONFIG_DIMS:
        return getattr(cfg, CONFIG_DIMS[d])
    return int(d) if d.isdigit() else d


def _eval_dim(d: str, cfg, dims: Mapping[str, int]) -> int:
    total = 0
    for term in d.split("+"):
        if term.isdigit():
            total += int(term)
        elif term in CONFIG_DIMS:
            total += getattr(cfg, CONFIG_DIMS[term])
        else:
            total += int(dims[term])
    return total


# ======================================================================================= the families
def _caches(role: str) -> tuple[Param, Param]:
    doc = "the paged cache, [num_pages, page_size, num_kv_heads, head_dim]"
    return (Param("k_cache", role, ("P", "S", "Hkv", "D"), doc=doc),
            Param("v_cache", role, ("P", "S", "Hkv", "D"), doc=doc))


_TABLES = (
    Param("block_table", "input", ("B", "M"), "int32", "pages of each sequence; entries past its last page ignored"),
    Param("seq_lens", "input", ("B",), "int32", "tokens in the cache per sequence (queries included), >= 1"),
)

DECODE = KernelSpec(
    "decode",
    (
        Param("q", "input", ("B", "Hq", "D"), doc="one query token per sequence"),
        *_caches("input"),
        *_TABLES,
        Param("out", "output", ("B", "Hq", "D")),
        Param("lse", "output", ("B", "Hq"), "float32", "natural log of the softmax denominator"),
        Param("o_part", "scratch", ("B", "NS", "Hq", "D"), "float32", "per-split partial outputs"),
        Param("lse_part", "scratch", ("B", "NS", "Hq"), "float32", "per-split log2-sum-exp"),
        Param("scale", "scalar", dtype="float32", doc="softmax scale"),
    ),
    {"B": "batch", "P": "num_pages", "M": "max_pages_per_seq", "NS": "KV splits per sequence"},
    # Split-KV: a task never gets fewer than this many tokens (merging partial states has a cost).
    {"min_split_tokens": 256},
)

PREFILL = KernelSpec(
    "prefill",
    (
        Param("q", "input", ("TQ", "Hq", "D"), doc="query rows of every sequence, back to back"),
        *_caches("input"),
        *_TABLES,
        Param("cu_seqlens_q", "input", ("B+1",), "int32", "row offsets of each sequence's queries"),
        Param("tiles", "input", ("NT", "3"), "int32", "(sequence, first row, end row) per task, rows relative"),
        Param("out", "output", ("TQ", "Hq", "D")),
        Param("lse", "output", ("TQ", "Hq"), "float32", "natural log of the softmax denominator"),
        Param("scale", "scalar", dtype="float32", doc="softmax scale"),
        Param("causal", "scalar", dtype="int32", doc="1: a query sees keys up to its own position"),
    ),
    {"TQ": "query rows", "P": "num_pages", "B": "batch", "M": "max_pages_per_seq", "NT": "tasks (query tiles)"},
    # Query rows of one prefill task: the CPU kernel's tile and the CUDA kernel's rows per pass.
    {"q_tile": 16},
)

WRITE_KV = KernelSpec(
    "write_kv",
    (
        Param("k", "input", ("N", "Hkv", "D"), doc="new tokens' keys"),
        Param("v", "input", ("N", "Hkv", "D"), doc="new tokens' values"),
        *_caches("inplace"),
        Param("slot_mapping", "input", ("N",), "int64", "slot = page * page_size + offset; -1 skips the token"),
    ),
    {"N": "tokens", "P": "num_pages"},
)

COPY_PAGES = KernelSpec(
    "copy_pages",
    (
        *_caches("inplace"),
        Param("src_pages", "input", ("C",), "int32"),
        Param("dst_pages", "input", ("C",), "int32", "distinct, disjoint from src_pages"),
    ),
    {"P": "num_pages", "C": "copies"},
)

SPECS: dict[str, KernelSpec] = {s.family: s for s in (DECODE, PREFILL, WRITE_KV, COPY_PAGES)}

# The block-form kernels MetaSchedule's paged and generic spaces tune (tuning only, never shipped): static shapes,
# no split scratch and no lse; the prefill form has q_len rows per sequence.
BLOCK_SPECS: dict[str, KernelSpec] = {
    "decode_generic": KernelSpec(
        "decode_generic",
        (Param("q", "input", ("B", "Hq", "D")), *_caches("input"), *_TABLES, Param("out", "output", ("B", "Hq", "D"))),
        {"B": "batch", "P": "num_pages", "M": "max_pages_per_seq"},
    ),
    "prefill_blocks": KernelSpec(
        "prefill_blocks",
        (Param("q", "input", ("TQ", "Hq", "D")), *_caches("input"), *_TABLES,
         Param("out", "output", ("TQ", "Hq", "D"))),
        {"TQ": "query rows", "B": "batch", "P": "num_pages", "M": "max_pages_per_seq"},
    ),
}


def spec_for(kernel: str) -> KernelSpec:
    """The spec of a shipped family or a block form, by name."""
    spec = SPECS.get(kernel) or BLOCK_SPECS.get(kernel)
    if spec is None:
        raise ValueError(f"kernel: no spec named {kernel!r} (one of {sorted(SPECS) + sorted(BLOCK_SPECS)})")
    return spec


# ================================================================================ planning, shared
def prefill_tiles(q_lens) -> list[tuple[int, int, int]]:
    """Prefill's tasks: ``(sequence, first row, end row)`` for every ``q_tile`` rows of each sequence's queries."""
    tile = PREFILL.constants["q_tile"]
    return [(b, r, min(r + tile, int(n))) for b, n in enumerate(q_lens) for r in range(0, int(n), tile)]


def decode_splits(longest: int, batch: int, page_size: int, workers: int) -> int:
    """KV splits per sequence: enough (sequence, split) tasks for ``2 * workers``, none shorter than
    ``min_split_tokens`` (or a page)."""
    want = math.ceil(2 * workers / batch) if batch < 2 * workers else 1
    cap = max(1, int(longest) // max(DECODE.constants["min_split_tokens"], page_size))
    return int(max(1, min(want, cap)))
