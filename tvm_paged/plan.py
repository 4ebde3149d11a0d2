"""Plans: a validated batch (page table, lengths, work split) and the kernels bound to it with their scratch.

FlashInfer's plan/run split: a plan is built once per batch and run once per layer. The first run with a given
kind of operands (shapes, dtypes, device, kernel source) resolves the compiled function for that configuration and
allocates the scratch it needs (split partials, and the ``lse`` when the caller does not ask for it); every later
run with the same kind of operands is one dictionary hit, a few checks that differ per layer, and one call. That
a step's kernels and scratch are fixed at plan time is also what lets a CUDA graph capture a step. Scratch comes
from a per-thread workspace shared by plans of the same shapes (see ``workspace_tensor``).

A plan's tables are in the library of the arrays it was built from (see :mod:`tvm_paged.arrays`): numpy tables
(on the host) or torch tensors on ``device``, copies the plan owns (the caller may change or reuse its arrays once
the plan is made). A run binds them in the library of its own operands, so a plan of numpy tables also runs
torch CPU operands (and the other way round), zero copy.
"""

from __future__ import annotations

import contextlib
import functools
import contextvars
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from . import arrays as A
from . import targets
from . import tvm_compat as tc
from . import validate as V
from .config import KernelConfig
from .spec import DECODE, PREFILL, Binder, decode_splits, invariant_split_pages, prefill_tiles

# Where kernels come from: ``provider(cfg, device) -> callable``. None (the default) compiles on demand through
# build.get_kernel; tvm_paged.loader installs a library's kernels instead.
_KERNEL_PROVIDER: contextvars.ContextVar = contextvars.ContextVar("tvm_paged_kernel_provider", default=None)
# Bindings one plan keeps (a plan normally sees one kind of operands for every layer).
_MAX_BINDINGS = 16


@contextlib.contextmanager
def use_kernels(provider):
    """Within the block (this thread/context only), kernels come from ``provider(cfg, device)`` instead of
    being compiled; validation is unchanged."""
    token = _KERNEL_PROVIDER.set(provider)
    try:
        yield
    finally:
        _KERNEL_PROVIDER.reset(token)


def kernel_for(cfg: KernelConfig, device, plan: "AttentionPlan | None" = None) -> Callable:
    """The compiled function for ``cfg`` on ``device``: the installed provider's, else built (attention kernels
    with the knobs tuned for the bucket nearest the plan's batch). On numpy's host device (:data:`arrays.CPU`)
    it takes numpy arrays."""
    fn = _kernel(cfg, device, plan)
    return fn if A.on_torch(device) else _numpy_kernel(fn)


def _numpy_kernel(fn: Callable) -> Callable:
    """``fn`` called with numpy arrays: each reaches TVM as a tensor over its memory (zero copy)."""

    def call(*args):
        return fn(*[tc.from_numpy(a) if isinstance(a, np.ndarray) else a for a in args])

    return call


def _kernel(cfg: KernelConfig, device, plan: "AttentionPlan | None") -> Callable:
    provider = _KERNEL_PROVIDER.get()
    if provider is not None:
        return provider(cfg, device)
    # Imported at the first kernel compiled here, never when a prebuilt library's kernels run: a device that only
    # loads exports does not need the compile path (kernel builders, TVMScript, LLVM codegen).
    from . import build  # noqa: PLC0415

    target = targets.target_for_device(device)
    if plan is None or plan.batch_invariant:  # one kernel whatever the batch: its knobs must not follow it
        return build.get_kernel(cfg, target)
    return build.get_kernel(cfg, target, batch=plan.batch, max_pages=int(plan.block_table.shape[1]))


@dataclass(eq=False)
class AttentionPlan:
    """A validated batch: page table, lengths and the work split, reusable across layers.

    ``block_table`` [batch, max_pages_per_seq] int32, ``seq_lens`` [batch] int32 (contiguous, on the caches'
    device: numpy arrays on the host, or torch tensors). Decode: ``num_splits`` KV splits per sequence, of
    ``split_pages`` pages each (0: each sequence's visible pages in ``num_splits`` equal parts). Prefill:
    ``cu_seqlens_q`` [batch + 1] int32 and ``tiles`` [num_tiles, 3] int32 rows of (sequence, first query row, end
    query row) relative to the sequence.
    ``window_left`` (-1: none) is the sliding window every run of the plan uses: the table's entries for pages
    wholly behind it are not read (they may be -1). ``batch_invariant``: splits and kernels chosen so that a
    sequence's result does not depend on the rest of the batch.
    """

    block_table: Any
    seq_lens: Any
    page_size: int
    num_pages: int
    num_splits: int = 1
    cu_seqlens_q: Any = None
    tiles: Any = None
    window_left: int = -1
    batch_invariant: bool = False
    split_pages: int = 0
    # The kernel's symbolic dimensions for this batch (spec names: B, M, P, and NS or TQ, NT).
    dims: dict = field(default_factory=dict, repr=False)
    # (thread, kernel source, operand shapes and dtypes, device) -> BoundKernel: the kernels bound to this plan.
    bindings: dict = field(default_factory=dict, repr=False)

    @property
    def batch(self) -> int:
        return int(self.block_table.shape[0])

    @property
    def is_prefill(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def device(self):
        """Where the tables are: :data:`arrays.CPU` (numpy) or a ``torch.device``."""
        return A.device(self.block_table)


class BoundKernel:
    """One compiled function bound to a plan: its argument order with the plan's tables and scratch filled in.
    ``lse`` is the workspace's, used when a caller does not ask for the LSE."""

    __slots__ = ("cfg", "fn", "binder", "default_scale", "lse")

    def __init__(self, cfg: KernelConfig, fn: Callable, binder: Binder, default_scale: float, lse):
        self.cfg, self.fn, self.binder, self.default_scale, self.lse = cfg, fn, binder, default_scale, lse


def operand_key(q, k_cache, v_cache) -> tuple:
    """What a binding depends on: the calling thread (a binding holds that thread's scratch: a plan run from two
    threads must not share split partials), the kernel source and the operands' shapes, dtypes and device (numpy
    arrays: their dtypes, which differ from torch's, say the library; they are all on the host)."""
    if isinstance(q, np.ndarray):
        return (threading.get_ident(), _KERNEL_PROVIDER.get(), q.shape, q.dtype, k_cache.shape, k_cache.dtype,
                v_cache.shape, v_cache.dtype)
    return (threading.get_ident(), _KERNEL_PROVIDER.get(), q.shape, q.dtype, q.device, k_cache.shape, k_cache.dtype,
            v_cache.shape, v_cache.dtype, v_cache.device)


def bind(plan: AttentionPlan, key: tuple, validate: Callable[[], KernelConfig], device) -> BoundKernel:
    """The kernel for operands of kind ``key`` on ``device`` (the caches') bound to ``plan``, with scratch from
    this thread's workspace, and the plan's tables in the operands' library.

    ``validate()`` checks the operands against the plan and returns their configuration. It runs once per kind of
    operands and plan shape in a thread: a later plan of the same shape (a serving loop's next step) reuses the
    checked configuration and the scratch, and only looks up its kernel and binds its own tables."""
    spec = PREFILL if plan.is_prefill else DECODE
    dims = plan.dims
    shared_key = (key, plan.page_size, device, tuple(dims.values()))
    shared = _thread_workspace().bound
    entry = shared.get(shared_key)
    if entry is None:
        cfg = validate()
        scratch = {p.name: workspace_tensor(spec, p.name, cfg, dims, device)
                   for p in spec.with_role("scratch", cfg=cfg)}
        entry = (cfg, scratch, workspace_tensor(spec, "lse", cfg, dims, device))
        if len(shared) >= _MAX_WORKSPACE_TENSORS:
            shared.clear()
        shared[shared_key] = entry
    cfg, scratch, lse = entry
    # Asked of the kernel source every time (a dictionary hit in build's cache), so clearing that cache or
    # committing new tuned knobs takes effect for the next plan.
    fn = kernel_for(cfg, device, plan)
    tables = {"block_table": A.to_device(plan.block_table, device), "seq_lens": A.to_device(plan.seq_lens, device)}
    if plan.is_prefill:
        tables.update(cu_seqlens_q=A.to_device(plan.cu_seqlens_q, device), tiles=A.to_device(plan.tiles, device))
    else:
        tables["split_pages"] = plan.split_pages
    if cfg.window:
        tables["window_left"] = plan.window_left
    bound = BoundKernel(cfg, fn, spec.binder(cfg, {**tables, **scratch}), cfg.head_dim ** -0.5, lse)
    if len(plan.bindings) >= _MAX_BINDINGS:
        plan.bindings.clear()
    plan.bindings[key] = bound
    return bound


# Scratch per thread, shared by every plan whose kernels need the same buffer: a serving loop builds a plan per
# step, and a fresh split-partials buffer per step (hundreds of KB: the allocator maps and zero-fills new pages)
# cost more than a short kernel. Kernels of one thread run one after another (on CUDA, in stream order), so
# sharing is safe; two threads never share.
_WORKSPACES = threading.local()
_MAX_WORKSPACE_TENSORS = 64


def _thread_workspace():
    ws = _WORKSPACES
    if not hasattr(ws, "tensors"):
        ws.tensors, ws.bound = {}, {}
    return ws


def workspace_tensor(spec, name: str, cfg: KernelConfig, dims: dict, device):
    """This thread's scratch array for parameter ``name`` of ``spec`` at the given dimensions (uninitialized):
    numpy on :data:`arrays.CPU`, else a torch tensor on ``device``."""
    shape, dtype = spec.shape_of(name, cfg, dims), spec.dtype_of(name, cfg)
    pool = _thread_workspace().tensors
    key = (spec.family, name, shape, dtype, device)
    t = pool.get(key)
    if t is None:
        if len(pool) >= _MAX_WORKSPACE_TENSORS:
            pool.clear()
        t = pool[key] = A.empty(shape, dtype, device)
    return t


# ===================================================================================== planning
@functools.lru_cache(maxsize=1)
def _num_threads() -> int:
    """Workers of TVM's CPU pool: tvm_compat sets ``TVM_NUM_THREADS`` before the pool starts, once."""
    try:
        return max(1, int(os.environ.get("TVM_NUM_THREADS", "0")))
    except ValueError:
        return 1


def choose_num_splits(seq_lens: np.ndarray, page_size: int, device) -> int:
    """Enough (sequence, split) tasks to keep every core busy, none shorter than the spec's minimum split.
    ``seq_lens``: the tokens each sequence attends to (its window's, with a sliding window)."""
    # A GPU: the streaming multiprocessors of a large one (over-splitting a small one is harmless).
    workers = 132 if device.type != "cpu" else _num_threads()
    return decode_splits(int(seq_lens.max()), len(seq_lens), page_size, workers)


def first_visible_key(seq_lens: np.ndarray, q_lens, window_left: int) -> np.ndarray:
    """Per sequence, the first key position any of its queries sees: 0 without a window; with one,
    ``window_left`` before its first query's position ``seq_len - q_len`` (int64 numpy)."""
    seq_lens = np.asarray(seq_lens, dtype=np.int64)
    if window_left < 0:
        return np.zeros_like(seq_lens)
    return np.maximum(seq_lens - np.asarray(q_lens, dtype=np.int64) - window_left, 0)


def _decode_split(lens: np.ndarray, page_size: int, window_left: int, batch_invariant: bool,
                  device) -> tuple[int, int]:
    """(num_splits, split_pages) of a decode batch: splits over each sequence's visible pages only."""
    first_page = first_visible_key(lens, 1, window_left) // page_size
    visible_pages = (lens + page_size - 1) // page_size - first_page
    if batch_invariant:
        per_split = invariant_split_pages(page_size)
        return int(((visible_pages + per_split - 1) // per_split).max()), per_split
    return choose_num_splits(visible_pages * page_size, page_size, device), 0


def plan_decode(block_table, seq_lens, *, page_size: int, num_pages: int, device=None, window_left: int = -1,
                batch_invariant: bool = False) -> AttentionPlan:
    """Validate a decode batch against a pool of ``num_pages`` pages of ``page_size`` tokens.

    ``block_table`` [batch, max_pages_per_seq] int32 (int64 accepted), ``seq_lens`` [batch] int32, numpy arrays
    or torch tensors (any torch tensor: torch tables, see :mod:`tvm_paged.arrays`); ``device``: where the kernels
    run (default: the table's device; numpy tables stay numpy on ``"cpu"``). ``window_left``: the sliding window
    of the runs (each query sees its last ``window_left + 1`` keys; -1 none): pages wholly behind it are neither
    read nor checked.
    ``batch_invariant``: split each sequence by its own length only (a fixed number of tokens per split), so its
    output is bitwise the same whatever else is in the batch."""
    window_left = V.check_window_left(window_left)
    torch_call = _torch_tables(device, block_table, seq_lens)
    bt, sl = _private_tables(torch_call, block_table=block_table, seq_lens=seq_lens)
    lens = V.check_block_table(bt, sl, page_size, num_pages,
                               first_key=lambda n: first_visible_key(n, 1, window_left))
    device = A.as_device(device, bt)
    splits, split_pages = _decode_split(lens, page_size, window_left, bool(batch_invariant), device)
    dims = {"B": int(bt.shape[0]), "P": int(num_pages), "M": int(bt.shape[1]), "NS": splits}
    return AttentionPlan(A.to_device(bt, device), A.to_device(sl, device), page_size, num_pages, num_splits=splits,
                         dims=dims, window_left=window_left, batch_invariant=bool(batch_invariant),
                         split_pages=split_pages)


_TABLE_SHAPES = {"block_table": (2, "[batch, max_pages_per_seq]"), "seq_lens": (1, "[batch]"),
                 "cu_seqlens_q": (1, "[batch + 1]")}


def _private_tables(torch_call: bool, **tables) -> list:
    """The named tables as int32 contiguous arrays that the plan owns: a copy of any the caller still holds, so
    changing the caller's table after the checks cannot steer a kernel out of bounds."""
    out = []
    for name, given in tables.items():
        rank, shape_doc = _TABLE_SHAPES[name]
        out.append(A.private(V.index_array(given, name, rank, shape_doc, torch_call), given))
    return out


def _torch_tables(device, *tables) -> bool:
    """Whether a plan's tables are torch tensors: any given is one, or ``device`` is a torch device (numpy
    tables for ``device=None`` or ``"cpu"`` stay numpy)."""
    return A.uses_torch(*tables) or (device is not None and A.on_torch(A.as_device(device, tables[0])))


def plan_prefill(block_table, seq_lens, cu_seqlens_q, total_q: int, *, page_size: int, num_pages: int,
                 device=None, window_left: int = -1, batch_invariant: bool = False) -> AttentionPlan:
    """Validate a (chunked) prefill batch; ``total_q`` is the number of query rows, ``cu_seqlens_q`` [batch + 1]
    int32 their offsets per sequence. ``window_left`` as in :func:`plan_decode`. Prefill's work split (tiles of
    one sequence's query rows) never depends on the rest of the batch: ``batch_invariant`` only pins the
    kernel's knobs (no batch-size bucket)."""
    window_left = V.check_window_left(window_left)
    torch_call = _torch_tables(device, block_table, seq_lens, cu_seqlens_q)
    bt, sl, cu = _private_tables(torch_call, block_table=block_table, seq_lens=seq_lens, cu_seqlens_q=cu_seqlens_q)
    checked = {}

    def first_key(lens):
        checked["q_lens"] = V.check_cu_seqlens(cu, bt.shape[0], total_q, sl)
        return first_visible_key(lens, checked["q_lens"], window_left)

    V.check_block_table(bt, sl, page_size, num_pages, first_key=first_key if window_left >= 0 else None)
    q_lens = checked.get("q_lens")
    if q_lens is None:
        q_lens = V.check_cu_seqlens(cu, bt.shape[0], total_q, sl)
    tiles = prefill_tiles(q_lens)
    device = A.as_device(device, bt)
    dims = {"TQ": int(total_q), "B": int(bt.shape[0]), "P": int(num_pages), "M": int(bt.shape[1]), "NT": len(tiles)}
    return AttentionPlan(A.to_device(bt, device), A.to_device(sl, device), page_size, num_pages,
                         cu_seqlens_q=A.to_device(cu, device), tiles=A.index_table(tiles, 3, device), dims=dims,
                         window_left=window_left, batch_invariant=bool(batch_invariant))
