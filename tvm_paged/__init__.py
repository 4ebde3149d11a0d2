"""tvm_paged: paged-attention kernels written once in TensorIR, tuned per target, shipped as compiled modules.

Cache layout: ``k_cache``, ``v_cache`` ``[num_pages, page_size, num_kv_heads, head_dim]``.
"""

import importlib

from .allocator import OutOfPages, PageAllocator
from .config import KernelConfig
from .loader import PagedLibrary, load
from .ops import copy_pages, paged_decode, paged_prefill, run_decode, run_prefill, write_kv
from .plan import AttentionPlan, plan_decode, plan_prefill

__version__ = "0.1.0"

# Imported on first use, so that a device that only loads exported kernels (TVM's runtime and numpy) imports
# none of it: serving a GGUF model needs the ``serve`` extra (gguf, tokenizers, jinja2), and the KV cache torch.
_LAZY = {"LLM": "tvm_paged.llm", "SamplingParams": "tvm_paged.sampling", "RequestOutput": "tvm_paged.llm",
         "CompletionOutput": "tvm_paged.llm", "PagedKVCache": "tvm_paged.cache"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'tvm_paged' has no attribute {name!r}")
    value = globals()[name] = getattr(importlib.import_module(_LAZY[name]), name)
    return value


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
    "LLM",
    "SamplingParams",
    "RequestOutput",
    "CompletionOutput",
]
