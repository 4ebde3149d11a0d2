"""Frozen kernel configurations and their names.

A configuration fixes everything a compiled kernel specializes on; batch size, pool size (``num_pages``) and
sequence lengths stay symbolic. Its ``name`` (``decode_f16_h32x8_d128_p16``) is at once the kernel's symbol,
the compile-cache key, the tuning-log folder and the test id.
"""

from __future__ import annotations

from dataclasses import dataclass

KERNELS = ("decode", "prefill", "write_kv", "copy_pages")
ATTENTION_KERNELS = ("decode", "prefill")

# dtype name -> short tag used in names, element size in bytes
DTYPES = {"float32": ("f32", 4), "float16": ("f16", 2), "bfloat16": ("bf16", 2)}


@dataclass(frozen=True)
class KernelConfig:
    """What one compiled kernel is specialized for.

    ``kernel``: one of ``decode``, ``prefill``, ``write_kv``, ``copy_pages``.
    ``dtype``: storage dtype of q and the caches (``float32``, ``float16``, ``bfloat16``); accumulation is float32.
    Page kernels (``write_kv``, ``copy_pages``) do not depend on the query heads: build them with
    :meth:`for_pages`, which sets ``num_qo_heads = num_kv_heads``.
    """

    kernel: str
    dtype: str
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        for field in ("num_qo_heads", "num_kv_heads", "head_dim", "page_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{field} must be a positive int, got {value!r}")
        if self.num_qo_heads % self.num_kv_heads:
            raise ValueError(
                f"num_qo_heads ({self.num_qo_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.kernel not in ATTENTION_KERNELS and self.num_qo_heads != self.num_kv_heads:
            raise ValueError(f"{self.kernel} does not depend on query heads: use KernelConfig.for_pages")

    @classmethod
    def for_pages(cls, kernel: str, dtype: str, num_kv_heads: int, head_dim: int, page_size: int) -> "KernelConfig":
        return cls(kernel, dtype, num_kv_heads, num_kv_heads, head_dim, page_size)

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 = MHA, num_qo_heads = MQA)."""
        return self.num_qo_heads // self.num_kv_heads

    @property
    def dtype_tag(self) -> str:
        return DTYPES[self.dtype][0]

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1]

    @property
    def name(self) -> str:
        if self.kernel in ATTENTION_KERNELS:
            heads = f"h{self.num_qo_heads}x{self.num_kv_heads}"
        else:
            heads = f"h{self.num_kv_heads}"
        return f"{self.kernel}_{self.dtype_tag}_{heads}_d{self.head_dim}_p{self.page_size}"

    def with_kernel(self, kernel: str) -> "KernelConfig":
        """The same shapes for another kernel (page kernels drop the query heads)."""
        if kernel in ATTENTION_KERNELS:
            return KernelConfig(kernel, self.dtype, self.num_qo_heads, self.num_kv_heads, self.head_dim, self.page_size)
        return KernelConfig.for_pages(kernel, self.dtype, self.num_kv_heads, self.head_dim, self.page_size)

    @classmethod
    def from_name(cls, name: str) -> "KernelConfig":
        """Inverse of :attr:`name`."""
        tag_to_dtype = {tag: dt for dt, (tag, _) in DTYPES.items()}
        try:
            *kernel_parts, tag, heads, d, p = name.split("_")
            kernel = "_".join(kernel_parts)
            dtype = tag_to_dtype[tag]
            hq, _, hkv = heads[1:].partition("x")
            head_dim, page_size = int(d[1:]), int(p[1:])
        except (ValueError, KeyError) as exc:
            raise ValueError(f"not a kernel config name: {name!r}") from exc
        if kernel in ATTENTION_KERNELS:
            return cls(kernel, dtype, int(hq), int(hkv), head_dim, page_size)
        return cls.for_pages(kernel, dtype, int(hq), head_dim, page_size)
