"""One definition per kernel family: its parameters (name, shape, dtype, role), its planning constants, and the
binding of a call's values to the compiled function's argument list.

The functional API (``ops``), the export manifest and the loader's checks, the tuner's argument maker and the
kernels' buffer types (``kernels/signatures.py``) all read these definitions, so adding a kernel argument is a
change here plus the builder bodies that use it. Pure Python: nothing here imports TVM or torch, so the loader,
the allocator's callers and the tuner's worker processes can all read it.

Shapes are tuples of dimension names. Upper-case names are the kernel's symbolic dimensions (``B`` batch, ``P``
pages in the pool, ...), fixed per call; ``Hq``, ``Hkv``, ``D``, ``S`` are the configuration's ``num_qo_heads``,
``num_kv_heads``, ``head_dim`` and ``page_size``; ``"B+1"`` is one more than ``B``. A dtype of ``"cfg"`` means the
configuration's ``dtype`` (q and out), ``"kv"`` the caches' element type inside the kernel (``uint8`` for 8-bit
caches, read as bytes).

A parameter with ``when`` exists only in the kernels of configurations with that variant (``"window"``,
``"soft_cap"``, ``"alibi"``, ``"sinks"``, ``"fp8"``): a variant's arguments are part of its compiled signature,
and the plain kernels do not take them.

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
_ITEMSIZE = {"int32": 4, "int64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "uint8": 1}
# Conditions a parameter may exist under: the configuration property that holds each.
WHEN = {"window": "window", "soft_cap": "soft_cap", "alibi": "alibi", "sinks": "sinks", "fp8": "is_fp8"}


@dataclass(frozen=True)
class Param:
    """One argument of a kernel family. ``shape``: dimension names (see the module docstring); ``dtype``: a
    dtype name, ``"cfg"`` or ``"kv"``; ``when``: the variant it belongs to (empty: every kernel of the family)."""

    name: str
    role: str
    shape: tuple[str, ...] = ()
    dtype: str = "cfg"
    doc: str = ""
    when: str = ""

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"param {self.name}: role {self.role!r} is not one of {ROLES}")
        if self.when and self.when not in WHEN:
            raise ValueError(f"param {self.name}: when {self.when!r} is not one of {tuple(WHEN)}")

    def present(self, cfg) -> bool:
        """Whether a kernel of ``cfg`` takes this parameter."""
        return not self.when or bool(getattr(cfg, WHEN[self.when]))

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

        object.__setattr__(self, "_for", {})

    names: tuple[str, ...] = field(init=False, repr=False, compare=False)
    tensor_names: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _by_name: dict = field(init=False, repr=False, compare=False)
    _for: dict = field(init=False, repr=False, compare=False)

    def params_for(self, cfg) -> tuple[Param, ...]:
        """The parameters a kernel of ``cfg`` takes, in argument order (its variants' included)."""
        key = _variant_key(cfg)
        cached = self._for.get(key)
        if cached is None:
            cached = self._for[key] = tuple(p for p in self.params if p.present(cfg))
        return cached

    def names_for(self, cfg) -> tuple[str, ...]:
        return tuple(p.name for p in self.params_for(cfg))

    def with_role(self, *roles: str, cfg=None) -> tuple[Param, ...]:
        """Parameters with one of ``roles`` (of ``cfg``'s kernels when given, else of the family)."""
        params = self.params if cfg is None else self.params_for(cfg)
        return tuple(p for p in params if p.role in roles)

    def dtype_of(self, name: str, cfg) -> str:
        dtype = self._by_name[name].dtype
        if dtype == "cfg":
            return cfg.dtype
        return cfg.kv_storage if dtype == "kv" else dtype

    def itemsize_of(self, name: str, cfg) -> int:
        return _ITEMSIZE[self.dtype_of(name, cfg)]

    def shape_of(self, name: str, cfg, dims: Mapping[str, int]) -> tuple[int, ...]:
        """The concrete shape of a tensor parameter for ``cfg`` and the symbolic dimensions' values ``dims``."""
        return tuple(_eval_dim(d, cfg, dims) for d in self._by_name[name].shape)

    def signature(self, cfg) -> list[dict]:
        """The parameters as the export manifest records them: name, role, dtype and shape (configuration
        dimensions as numbers, symbolic ones by name)."""
        out = []
        for p in self.params_for(cfg):
            entry = {"name": p.name, "role": p.role, "dtype": self.dtype_of(p.name, cfg)}
            if p.is_tensor:
                entry["shape"] = [_config_dim(d, cfg) for d in p.shape]
            out.append(entry)
        return out

    def binder(self, cfg, fixed: Mapping[str, Any]) -> "Binder":
        """A :class:`Binder` for ``cfg``'s kernel with ``fixed`` (typically the plan's tables and workspace
        scratch) bound."""
        return Binder(self, cfg, fixed)


def _variant_key(cfg) -> tuple:
    return tuple(bool(getattr(cfg, attr)) for attr in WHEN.values())


class Binder:
    """Orders a call's arguments: the fixed values given once (a plan's page table, lengths and scratch), the
    rest per call by name. ``binder(q=q, out=out, ...)`` returns the positional argument list."""

    __slots__ = ("_template", "_slots", "spec")
    # (spec, variants, names fixed) -> the positions of the names given per call: a plan per step binds the same
    # names.
    _SLOTS: dict = {}

    def __init__(self, spec: KernelSpec, cfg, fixed: Mapping[str, Any]):
        key = (id(spec), _variant_key(cfg), tuple(fixed))
        names = spec.names_for(cfg)
        slots = Binder._SLOTS.get(key)
        if slots is None:
            unknown = set(fixed) - set(names)
            if unknown:
                raise ValueError(f"{spec.family}: no parameters named {sorted(unknown)} in {cfg.name}")
            slots = Binder._SLOTS[key] = tuple((i, n) for i, n in enumerate(names) if n not in fixed)
        self.spec = spec
        self._template = [fixed.get(n) for n in names]
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
    doc = "the paged cache, [num_pages, page_size, num_kv_heads, head_dim] (8-bit caches as their bytes)"
    return (Param("k_cache", role, ("P", "S", "Hkv", "D"), "kv", doc=doc),
            Param("v_cache", role, ("P", "S", "Hkv", "D"), "kv", doc=doc))


# 8-bit caches: per-KV-head dequantization scales (a per-tensor scale is broadcast by the API).
_KV_SCALES = (
    Param("k_scale", "input", ("Hkv",), "float32", "K = float(k_cache) * k_scale[kv head]", when="fp8"),
    Param("v_scale", "input", ("Hkv",), "float32", "V = float(v_cache) * v_scale[kv head]", when="fp8"),
)
# Per-query-head options of the attention kernels.
_HEAD_OPTIONS = (
    Param("alibi_slopes", "input", ("Hq",), "float32", "logit += slope[h] * (key position - query position)",
          when="alibi"),
    Param("sinks", "input", ("Hq",), "float32", "one extra logit per head in the softmax denominator, no value",
          when="sinks"),
)
_SCALAR_OPTIONS = (
    Param("window_left", "scalar", dtype="int32", doc="keys j < p - window_left are masked (p: the query's "
          "position); >= 0", when="window"),
    Param("logits_soft_cap", "scalar", dtype="float32", doc="logit = cap * tanh(logit / cap); > 0",
          when="soft_cap"),
)


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
        *_KV_SCALES,
        *_HEAD_OPTIONS,
        Param("out", "output", ("B", "Hq", "D")),
        Param("lse", "output", ("B", "Hq"), "float32", "natural log of the softmax denominator"),
        Param("o_part", "scratch", ("B", "NS", "Hq", "D"), "float32", "per-split partial outputs"),
        Param("ms_part", "scratch", ("B", "NS", "Hq", "2"), "float32", "per split: the running max and the "
              "weight sum (log2 domain), kept apart: their sum as one log-sum-exp loses the weights' precision "
              "when logits are large (float32's spacing is 1/16 at 5e5)"),
        Param("scale", "scalar", dtype="float32", doc="softmax scale"),
        Param("split_pages", "scalar", dtype="int32", doc="pages per KV split; 0: each sequence's visible "
              "pages in NS equal parts"),
        *_SCALAR_OPTIONS,
    ),
    {"B": "batch", "P": "num_pages", "M": "max_pages_per_seq", "NS": "KV splits per sequence"},
    # Split-KV: a task never gets fewer than this many tokens (merging partial states has a cost). A
    # batch-invariant plan splits every sequence every ``invariant_split_tokens`` tokens instead.
    {"min_split_tokens": 256, "invariant_split_tokens": 1024},
)

PREFILL = KernelSpec(
    "prefill",
    (
        Param("q", "input", ("TQ", "Hq", "D"), doc="query rows of every sequence, back to back"),
        *_caches("input"),
        *_TABLES,
        Param("cu_seqlens_q", "input", ("B+1",), "int32", "row offsets of each sequence's queries"),
        Param("tiles", "input", ("NT", "3"), "int32", "(sequence, first row, end row) per task, rows relative"),
        *_KV_SCALES,
        *_HEAD_OPTIONS,
        Param("out", "output", ("TQ", "Hq", "D")),
        Param("lse", "output", ("TQ", "Hq"), "float32", "natural log of the softmax denominator"),
        Param("scale", "scalar", dtype="float32", doc="softmax scale"),
        Param("causal", "scalar", dtype="int32", doc="1: a query sees keys up to its own position"),
        *_SCALAR_OPTIONS,
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
        Param("k_scale", "input", ("Hkv",), "float32", "8-bit caches store k / k_scale[kv head], rounded to "
              "nearest even and clamped to the format's finite range", when="fp8"),
        Param("v_scale", "input", ("Hkv",), "float32", "the same for v", when="fp8"),
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
    ``min_split_tokens`` (or a page). ``longest``: the most tokens a sequence of the batch attends to."""
    want = math.ceil(2 * workers / batch) if batch < 2 * workers else 1
    cap = max(1, int(longest) // max(DECODE.constants["min_split_tokens"], page_size))
    return int(max(1, min(want, cap)))


def invariant_split_pages(page_size: int) -> int:
    """Pages per split of a batch-invariant decode plan: a fixed number of tokens, whatever the batch or the
    machine, so a sequence's splits (and its output, bit for bit) depend on its own length only."""
    return max(1, DECODE.constants["invariant_split_tokens"] // page_size)

