"""tvm_paged: paged-attention kernels written once in TensorIR, tuned per target, shipped as compiled modules.

Cache layout: ``k_cache``, ``v_cache`` ``[num_pages, page_size, num_kv_heads, head_dim]``.
"""

from .allocator import OutOfPages, PageAllocator
from .cache import PagedKVCache
from .config import KernelConfig
from .loader import PagedLibrary, load
from .ops import copy_pages, paged_decode, paged_prefill, run_decode, run_prefill, write_kv
from .plan import AttentionPlan, plan_decode, plan_prefill

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
    "load",
    "PagedLibrary",
]
