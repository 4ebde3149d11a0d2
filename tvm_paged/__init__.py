"""tvm_paged: paged-attention kernels written once in TensorIR, tuned per target, shipped as compiled modules.

Cache layout: ``k_cache``, ``v_cache`` ``[num_pages, page_size, num_kv_heads, head_dim]``.
"""

from .allocator import OutOfPages, PageAllocator
from .cache import PagedKVCache
from .config import KernelConfig
from .ops import AttentionPlan, copy_pages, paged_decode, paged_prefill, plan_decode, plan_prefill, run_decode, \
    run_prefill, write_kv

__version__ = "0.1.0"

__all__ = [
    "KernelConfig",
    "AttentionPlan",
    "paged_decode",
    "paged_prefill",
    "plan_decode",
    "plan_prefill",
    "run_decode",
    "run_prefill",
    "write_kv",
    "copy_pages",
    "PageAllocator",
    "OutOfPages",
    "PagedKVCache",
]

from .loader import PagedLibrary, load  # noqa: E402

__all__ += ["load", "PagedLibrary"]
