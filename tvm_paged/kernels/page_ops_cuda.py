"""KV write and page copy for CUDA GPUs: the in-place cache updates that precede attention.

Same signatures as :mod:`tvm_paged.kernels.page_ops_cpu`:

    write_kv:   k, v [num_tokens, num_kv_heads, head_dim]; k_cache, v_cache [num_pages, page_size, num_kv_heads,
                head_dim] (written); slot_mapping [num_tokens] int64, slot = page * page_size + offset, -1 = skip.
    copy_pages: k_cache, v_cache (written); src_pages, dst_pages [num_copies] int32: whole pages, both caches.

Both are flat, coalesced copies of raw words (the element type never matters): one thread moves one 16-byte vector
of K and the same of V; consecutive threads move consecutive vectors of a token row (``num_kv_heads * head_dim``
elements) or of a page. Vector accesses assume 16-byte aligned base pointers (CUDA allocations are).
"""

from __future__ import annotations

from ..config import KernelConfig
from ..tvm_compat import T
from .common import is_pow2
from .decode_cuda import target_limits
from .signatures import copy_pages_args, write_kv_args


def page_ops_plan(cfg: KernelConfig, target=None, *, vec_bytes: int = 16, num_threads: int = 256) -> dict:
    """Knobs: ``vec_bytes`` moved per thread per cache (default 16: one 128-bit load/store), ``num_threads`` per
    block (default 256). Rows are moved as raw 32-bit words (16-bit when a row's byte count is not a multiple
    of 4): a copy needs no arithmetic on the element type."""
    lim = target_limits(target)
    row_bytes = cfg.num_kv_heads * cfg.head_dim * cfg.itemsize
    unit = 4 if row_bytes % 4 == 0 else 2
    if not is_pow2(vec_bytes) or vec_bytes < unit or vec_bytes > 16:
        raise ValueError(f"vec_bytes ({vec_bytes}) must be a power of two in [{unit}, 16]")
    vec = vec_bytes // unit
    while vec > 1 and (row_bytes // unit) % vec:
        vec //= 2
    if num_threads < 1 or num_threads > lim["max_threads"] or num_threads % lim["warp"]:
        raise ValueError(f"num_threads ({num_threads}) must be a multiple of the warp ({lim['warp']}) and at most "
                         f"{lim['max_threads']}")
    return {"word": f"uint{unit * 8}", "row_words": row_bytes // unit, "vec": vec, "num_threads": num_threads}


def build_write_kv_cuda(cfg: KernelConfig, target=None, **knobs):
    """Return the write_kv PrimFunc for ``cfg`` on a CUDA target (knobs: see :func:`page_ops_plan`).

    Its parameters are :data:`tvm_paged.spec.WRITE_KV`'s (``dtype`` = ``cfg.dtype``; ``N``, ``P`` symbolic):
    k, v [N, Hkv, D] dtype; k_cache, v_cache [P, S, Hkv, D] dtype (written in place); slot_mapping [N] int64.
    """
    if cfg.kernel != "write_kv":
        raise ValueError(f"write_kv kernel needs a write_kv config, got {cfg.name}")
    plan = page_ops_plan(cfg, target, **knobs)
    S = cfg.page_size
    W, RW, VEC, NT = plan["word"], plan["row_words"], plan["vec"], plan["num_threads"]
    RV = RW // VEC  # vectors per token row

    a = write_kv_args(cfg)
    N, P = a.N, a.P

    @T.prim_func
    def write_kv(K: a.k, V: a.v, KC: a.k_cache, VC: a.v_cache, SLOT: a.slot_mapping):
        T.func_attr({"global_symbol": cfg.name, "tirx.noalias": True})
        # Raw-word views of the same memory.
        Kw = T.decl_buffer((N * RW,), W, data=K.data)
        Vw = T.decl_buffer((N * RW,), W, data=V.data)
        KCw = T.decl_buffer((P * S * RW,), W, data=KC.data)
        VCw = T.decl_buffer((P * S * RW,), W, data=VC.data)
        for bx in T.thread_binding(T.max((N * RV + (NT - 1)) // NT, T.int64(1)), thread="blockIdx.x"):
            for tx in T.thread_binding(NT, thread="threadIdx.x"):
                idx: T.let[T.int64] = bx * NT + tx
                if idx < N * RV:
                    i: T.let[T.int64] = idx // RV
                    j: T.let[T.int64] = (idx % RV) * VEC
                    slot: T.let[T.int64] = SLOT[i]
                    if slot >= T.int64(0):
                        for v in T.vectorized(VEC):
                            KCw[slot * RW + j + v] = Kw[i * RW + j + v]
                        for v in T.vectorized(VEC):
                            VCw[slot * RW + j + v] = Vw[i * RW + j + v]

    return write_kv


def build_copy_pages_cuda(cfg: KernelConfig, target=None, **knobs):
    """Return the copy_pages PrimFunc for ``cfg`` on a CUDA target (knobs: see :func:`page_ops_plan`).

    Its parameters are :data:`tvm_paged.spec.COPY_PAGES`'s (``dtype`` = ``cfg.dtype``; ``P``, ``C`` symbolic):
    k_cache, v_cache [P, S, Hkv, D] dtype (written in place); src_pages, dst_pages [C] int32.
    """
    if cfg.kernel != "copy_pages":
        raise ValueError(f"copy_pages kernel needs a copy_pages config, got {cfg.name}")
    plan = page_ops_plan(cfg, target, **knobs)
    S = cfg.page_size
    W, RW, VEC, NT = plan["word"], plan["row_words"], plan["vec"], plan["num_threads"]
    PW = S * RW  # words per page
    PV = PW // VEC  # vectors per page

    a = copy_pages_args(cfg)
    P, C = a.P, a.C

    @T.prim_func
    def copy_pages(KC: a.k_cache, VC: a.v_cache, SRC: a.src_pages, DST: a.dst_pages):
        T.func_attr({"global_symbol": cfg.name, "tirx.noalias": True})
        KCw = T.decl_buffer((P * PW,), W, data=KC.data)
        VCw = T.decl_buffer((P * PW,), W, data=VC.data)
        for bx in T.thread_binding(T.max((C * PV + (NT - 1)) // NT, T.int64(1)), thread="blockIdx.x"):
            for tx in T.thread_binding(NT, thread="threadIdx.x"):
                idx: T.let[T.int64] = bx * NT + tx
                if idx < C * PV:
                    c: T.let[T.int64] = idx // PV
                    j: T.let[T.int64] = (idx % PV) * VEC
                    src: T.let[T.int64] = T.Cast("int64", SRC[c])
                    dst: T.let[T.int64] = T.Cast("int64", DST[c])
                    for v in T.vectorized(VEC):
                        KCw[dst * PW + j + v] = KCw[src * PW + j + v]
                    for v in T.vectorized(VEC):
                        VCw[dst * PW + j + v] = VCw[src * PW + j + v]

    return copy_pages
