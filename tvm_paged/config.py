"""Frozen kernel configurations and their names.

A configuration fixes everything a compiled kernel specializes on; batch size, pool size (``num_pages``) and
sequence lengths stay symbolic, and so do the values of the attention options (the window's length, the cap, the
slopes, the sinks, the fp8 scales): only whether an option is on is compiled in, so the plain kernels carry none
of the variants' work. Its ``name`` (``decode_f16_h32x8_d128_p16``, ``decode_e4m3_f16_h32x8_d128_p16_w_cap``) is
at once the kernel's symbol, the compile-cache key, the tuning-log folder and the test id.
"""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass

KERNELS = ("decode", "prefill", "write_kv", "copy_pages")
ATTENTION_KERNELS = ("decode", "prefill")

# dtype name -> short tag used in names, element size in bytes: the dtypes of q, out, and of write_kv's k and v.
DTYPES = {"float32": ("f32", 4), "float16": ("f16", 2), "bfloat16": ("bf16", 2)}
# 8-bit KV cache dtypes (torch.float8_e4m3fn, torch.float8_e5m2): the kernels read them as bytes and widen them in
# registers; ``fp8_max`` is the largest finite value write_kv clamps to.
FP8_DTYPES = {"float8_e4m3fn": ("e4m3", 1), "float8_e5m2": ("e5m2", 1)}
FP8_MAX = {"float8_e4m3fn": 448.0, "float8_e5m2": 57344.0}
KV_DTYPES = {**DTYPES, **FP8_DTYPES}


def check_int(value, name: str, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``: a Python or numpy integer, not a bool, a float or a string (a count or
    size of 4.7 is a caller's bug, not 4); else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return int(value)


# The largest value of each size a kernel is built for: above every model's (MLA's head_dim is 576; vLLM's page
# sizes reach 256).
_LIMITS = {"num_qo_heads": 1024, "num_kv_heads": 1024, "head_dim": 1024, "page_size": 4096}

# Attention variants, in name order: (field of KernelConfig, tag in the name).
VARIANTS = (("window", "w"), ("soft_cap", "cap"), ("alibi", "alibi"), ("sinks", "sink"))

_NAME = re.compile(
    r"^(?P<kernel>decode|prefill|write_kv|copy_pages)_(?:(?P<kv>e4m3|e5m2)_)?(?P<tag>f32|f16|bf16|e4m3|e5m2)"
    r"_h(?P<hq>\d+)(?:x(?P<hkv>\d+))?_d(?P<d>\d+)_p(?P<p>\d+)(?P<variants>(?:_(?:w|cap|alibi|sink))*)$"
)


@dataclass(frozen=True)
class KernelConfig:
    """What one compiled kernel is specialized for.

    ``kernel``: one of ``decode``, ``prefill``, ``write_kv``, ``copy_pages``.
    ``dtype``: dtype of q and out (attention) or of the k and v written (``write_kv``): ``float32``, ``float16``,
    ``bfloat16``; accumulation is float32. ``copy_pages`` reads nothing but the caches: its ``dtype`` is theirs.
    ``kv_dtype``: the caches' dtype; ``None`` (the default) means ``dtype``; ``float8_e4m3fn`` or ``float8_e5m2``
    for an 8-bit cache (dequantized with per-KV-head scales passed at run time).
    ``window``, ``soft_cap``, ``alibi``, ``sinks``: attention variants compiled in (their values are arguments):
    a sliding window (``window_left``), a logits soft-cap, ALiBi slopes, attention-sink logits.
    Page kernels (``write_kv``, ``copy_pages``) do not depend on the query heads: build them with
    :meth:`for_pages`, which sets ``num_qo_heads = num_kv_heads``.
    """

    kernel: str
    dtype: str
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    kv_dtype: str | None = None
    window: bool = False
    soft_cap: bool = False
    alibi: bool = False
    sinks: bool = False

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        dtypes = KV_DTYPES if self.kernel == "copy_pages" else DTYPES
        if self.dtype not in dtypes:
            raise ValueError(f"dtype must be one of {tuple(dtypes)}, got {self.dtype!r}")
        if self.kv_dtype is None:
            object.__setattr__(self, "kv_dtype", self.dtype)
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {tuple(KV_DTYPES)}, got {self.kv_dtype!r}")
        if self.kv_dtype != self.dtype and (self.kv_dtype not in FP8_DTYPES or self.kernel == "copy_pages"):
            raise ValueError(f"kv_dtype {self.kv_dtype!r} with dtype {self.dtype!r}: a cache is either in the "
                             f"dtype of q (k, v) or 8-bit ({tuple(FP8_DTYPES)})")
        for field in ("num_qo_heads", "num_kv_heads", "head_dim", "page_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{field} must be a positive int, got {value!r}")
            if value > _LIMITS[field]:  # larger ones overflow the kernels' 32-bit extents or never finish compiling
                raise ValueError(f"{field} must be at most {_LIMITS[field]}, got {value}")
        for field, _ in VARIANTS:
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"{field} must be a bool, got {getattr(self, field)!r}")
        if self.num_qo_heads % self.num_kv_heads:
            raise ValueError(
                f"num_qo_heads ({self.num_qo_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.kernel not in ATTENTION_KERNELS:
            if self.num_qo_heads != self.num_kv_heads:
                raise ValueError(f"{self.kernel} does not depend on query heads: use KernelConfig.for_pages")
            if self.variants:
                raise ValueError(f"{self.kernel} has no attention variants, got {self.variants}")

    @classmethod
    def for_pages(cls, kernel: str, dtype: str, num_kv_heads: int, head_dim: int, page_size: int,
                  kv_dtype: str | None = None) -> "KernelConfig":
        return cls(kernel, dtype, num_kv_heads, num_kv_heads, head_dim, page_size, kv_dtype)

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 = MHA, num_qo_heads = MQA)."""
        return self.num_qo_heads // self.num_kv_heads

    @property
    def dtype_tag(self) -> str:
        return KV_DTYPES[self.dtype][0]

    @property
    def itemsize(self) -> int:
        """Bytes per element of q and out (k and v for ``write_kv``)."""
        return KV_DTYPES[self.dtype][1]

    @property
    def kv_itemsize(self) -> int:
        """Bytes per element of the caches."""
        return KV_DTYPES[self.kv_dtype][1]

    @property
    def is_fp8(self) -> bool:
        """The caches are 8-bit (and dequantized with ``k_scale`` / ``v_scale``)."""
        return self.kv_dtype in FP8_DTYPES

    @property
    def kv_storage(self) -> str:
        """The caches' element type inside a kernel: ``uint8`` for 8-bit caches (bytes, widened by the kernel's own
        arithmetic: no TVM backend is trusted with float8 casts), else ``kv_dtype``."""
        return "uint8" if self.is_fp8 else self.kv_dtype

    @property
    def variants(self) -> tuple[str, ...]:
        """Tags of the compiled-in variants, in name order (``("w", "cap")``)."""
        return tuple(tag for field, tag in VARIANTS if getattr(self, field))

    @property
    def is_plain(self) -> bool:
        """No variant and a cache in q's dtype: the base kernel."""
        return not self.variants and not self.is_fp8

    @property
    def name(self) -> str:
        if self.kernel in ATTENTION_KERNELS:
            heads = f"h{self.num_qo_heads}x{self.num_kv_heads}"
        else:
            heads = f"h{self.num_kv_heads}"
        kv = f"{FP8_DTYPES[self.kv_dtype][0]}_" if self.kv_dtype != self.dtype else ""
        suffix = "".join(f"_{tag}" for tag in self.variants)
        return f"{self.kernel}_{kv}{self.dtype_tag}_{heads}_d{self.head_dim}_p{self.page_size}{suffix}"

    def with_kernel(self, kernel: str) -> "KernelConfig":
        """The same shapes and cache dtype for another kernel (page kernels drop the query heads and variants;
        ``copy_pages`` takes the caches' dtype)."""
        if kernel in ATTENTION_KERNELS:
            return KernelConfig(kernel, self.dtype, self.num_qo_heads, self.num_kv_heads, self.head_dim,
                                self.page_size, self.kv_dtype, self.window, self.soft_cap, self.alibi, self.sinks)
        dtype = self.kv_dtype if kernel == "copy_pages" else self.dtype
        return KernelConfig.for_pages(kernel, dtype, self.num_kv_heads, self.head_dim, self.page_size,
                                      self.kv_dtype)

    def with_variants(self, **flags) -> "KernelConfig":
        """The same configuration with some of ``kv_dtype``, ``window``, ``soft_cap``, ``alibi``, ``sinks``
        changed."""
        fields = {f: getattr(self, f) for f in ("kernel", "dtype", "num_qo_heads", "num_kv_heads", "head_dim",
                                                 "page_size", "kv_dtype", *(v for v, _ in VARIANTS))}
        unknown = set(flags) - {"kv_dtype", *(v for v, _ in VARIANTS)}
        if unknown:
            raise ValueError(f"with_variants: unknown fields {sorted(unknown)}")
        return KernelConfig(**{**fields, **flags})

    @classmethod
    def from_name(cls, name: str) -> "KernelConfig":
        """Inverse of :attr:`name`."""
        match = _NAME.match(name)
        if match is None:
            raise ValueError(f"not a kernel config name: {name!r}")
        tag_to_dtype = {tag: dt for dt, (tag, _) in KV_DTYPES.items()}
        kernel, dtype = match["kernel"], tag_to_dtype[match["tag"]]
        kv_dtype = tag_to_dtype[match["kv"]] if match["kv"] else None
        tags = set(match["variants"].split("_")[1:])
        flags = {field: tag in tags for field, tag in VARIANTS}
        hq, d, p = int(match["hq"]), int(match["d"]), int(match["p"])
        if kernel in ATTENTION_KERNELS:
            if match["hkv"] is None:
                raise ValueError(f"not a kernel config name: {name!r} (attention names give hQxKV heads)")
            cfg = cls(kernel, dtype, hq, int(match["hkv"]), d, p, kv_dtype, **flags)
        else:
            cfg = cls.for_pages(kernel, dtype, hq, d, p, kv_dtype)
        if cfg.name != name:  # variant tags out of order or repeated
            raise ValueError(f"not a kernel config name: {name!r} (the canonical name is {cfg.name!r})")
        return cfg
