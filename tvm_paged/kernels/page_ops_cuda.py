"""KV write and page copy for CUDA GPUs: the in-place cache updates that precede attention.

Same signatures as :mod:`tvm_paged.kernels.page_ops_cpu`:

    write_kv:   k, v [num_tokens, num_kv_heads, head_dim]; k_cache, v_cache [num_pages, page_size, num_kv_heads,
                head_dim] (written); slot_mapping [num_tokens] int64, slot = page * page_size + offset, -1 = skip.
    copy_pages: k_cache, v_cache (written); src_pages, dst_pages [num_copies] int32: whole pages, both caches.

Both are flat, coalesced copies of raw words (the element type never matters): one thread moves one 16-byte vector
of K and the same of V; consecutive threads move consecutive vectors of a token row (``num_kv_heads * head_dim``
elements) or of a page. Vector accesses assume 16-byte aligned base pointers (CUDA allocations are).

An 8-bit cache (``kv_dtype`` e4m3 / e5m2, stored as bytes): ``copy_pages`` copies its bytes like any other;
``write_kv`` quantizes, one thread per 16 codes of a token row: ``fp8_narrow(float(k) / k_scale[kv head])``, an
IEEE division (``__fdiv_rn``, exact under ``--use_fast_math``), so the codes are bitwise torch's
``(k.float() / scale).clamp(-max, max).to(float8)``.
"""

from __future__ import annotations

from ..config import FP8_MAX, KernelConfig
from ..spec import COPY_PAGES, WRITE_KV
from ..tvm_compat import T
from .common import fp8_narrow, is_pow2, to_f32
from .decode_cuda import target_limits
from .signatures import copy_pages_args, finish, write_kv_args


def page_ops_plan(cfg: KernelConfig, target=None, *, vec_bytes: int = 16, num_threads: int = 256) -> dict:
    """Knobs: ``vec_bytes`` moved per thread per cache (default 16: one 128-bit load/store), ``num_threads`` per
    block (default 256). Rows are moved as raw 32-bit words (16-bit when a row's byte count is not a multiple
    of 4): a copy needs no arithmetic on the element type.

    A quantizing ``write_kv`` (8-bit cache) moves ``vec`` elements per thread instead: ``vec_bytes`` codes (a power
    of two dividing head_dim, so a vector stays in one KV head)."""
    lim = target_limits(target)
    if num_threads < 1 or num_threads > lim["max_threads"] or num_threads % lim["warp"]:
        raise ValueError(f"num_threads ({num_threads}) must be a multiple of the warp ({lim['warp']}) and at most "
                         f"{lim['max_threads']}")
    if cfg.kernel == "write_kv" and cfg.is_fp8:
        if not is_pow2(vec_bytes) or vec_bytes > 16:
            raise ValueError(f"vec_bytes ({vec_bytes}) must be a power of two in [1, 16]")
        vec = vec_bytes
        while vec > 1 and cfg.head_dim % vec:
            vec //= 2
        return {"vec": vec, "in_lanes": min(vec, 16 // cfg.itemsize),
                "row_vecs": cfg.num_kv_heads * cfg.head_dim // vec, "num_threads": num_threads}
    row_bytes = cfg.num_kv_heads * cfg.head_dim * cfg.itemsize
    unit = 4 if row_bytes % 4 == 0 else 2
    if not is_pow2(vec_bytes) or vec_bytes < unit or vec_bytes > 16:
        raise ValueError(f"vec_bytes ({vec_bytes}) must be a power of two in [{unit}, 16]")
    vec = vec_bytes // unit
    while vec > 1 and (row_bytes // unit) % vec:
        vec //= 2
    return {"word": f"uint{unit * 8}", "row_words": row_bytes // unit, "vec": vec, "num_threads": num_threads}


def build_write_kv_cuda(cfg: KernelConfig, target=None, **knobs):
    """Return the write_kv PrimFunc for ``cfg`` on a CUDA target (knobs: see :func:`page_ops_plan`).

    Its parameters are :data:`tvm_paged.spec.WRITE_KV`'s (``dtype`` = ``cfg.dtype``; ``N``, ``P`` symbolic):
    k, v [N, Hkv, D] dtype; k_cache, v_cache [P, S, Hkv, D] ``cfg.kv_storage`` (written in place); slot_mapping [N]
    int64; k_scale, v_scale [Hkv] float32 (8-bit caches only).
    """
    if cfg.kernel != "write_kv":
        raise ValueError(f"write_kv kernel needs a write_kv config, got {cfg.name}")
    plan = page_ops_plan(cfg, target, **knobs)
    if cfg.is_fp8:
        return _build_write_kv_fp8(cfg, plan)
    S = cfg.page_size
    W, RW, VEC, NT = plan["word"], plan["row_words"], plan["vec"], plan["num_threads"]
    RV = RW // VEC  # vectors per token row

    a = write_kv_args(cfg)
    N, P = a.N, a.P

    @T.prim_func
    def write_kv(K: a.k, V: a.v, KC: a.k_cache, VC: a.v_cache, SLOT: a.slot_mapping, KS: a.k_scale, VS: a.v_scale):
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

    return finish(WRITE_KV, cfg, write_kv)


def _build_write_kv_fp8(cfg: KernelConfig, plan: dict):
    """write_kv into an 8-bit cache: each thread quantizes ``vec`` elements of one KV head of a token row."""
    D, S, dt = cfg.head_dim, cfg.page_size, cfg.dtype
    VEC, IL, RV, NT = plan["vec"], plan["in_lanes"], plan["row_vecs"], plan["num_threads"]
    fp8_max = FP8_MAX[cfg.kv_dtype]

    def quotient(x, scale):
        # An IEEE division (not fast math's approximation, not a reciprocal multiply): torch's rounding.
        return T.call_pure_extern("float32", "__fdiv_rn", to_f32(x, dt), scale)

    @T.macro
    def quantize(X, XC, XS, xin, xq, out, i, h, d0, slot):
        """Codes of ``X[i, h, d0:d0 + VEC]`` (scale ``XS[h]``) into the cache ``XC`` at ``slot``."""
        for c in T.unroll(VEC // IL):
            for v in T.vectorized(IL):
                xin[c * IL + v] = X[i, h, d0 + c * IL + v]
        for v in T.unroll(VEC):
            xq[v] = quotient(xin[v], XS[h])
        for v in T.unroll(VEC):
            out[v] = fp8_narrow(xq[v], cfg.kv_dtype, fp8_max)
        for v in T.vectorized(VEC):
            XC[slot // S, slot % S, h, d0 + v] = out[v]

    a = write_kv_args(cfg)
    N = a.N

    @T.prim_func
    def write_kv(K: a.k, V: a.v, KC: a.k_cache, VC: a.v_cache, SLOT: a.slot_mapping, KS: a.k_scale, VS: a.v_scale):
        T.func_attr({"global_symbol": cfg.name, "tirx.noalias": True})
        for bx in T.thread_binding(T.max((N * RV + (NT - 1)) // NT, T.int64(1)), thread="blockIdx.x"):
            for tx in T.thread_binding(NT, thread="threadIdx.x"):
                xin = T.alloc_buffer((VEC,), dt, scope="local")
                xq = T.alloc_buffer((VEC,), "float32", scope="local")
                out = T.alloc_buffer((VEC,), "uint8", scope="local")
                idx: T.let[T.int64] = bx * NT + tx
                if idx < N * RV:
                    i: T.let[T.int64] = idx // RV
                    h: T.let[T.int64] = (idx % RV) * VEC // D
                    d0: T.let[T.int64] = (idx % RV) * VEC % D
                    slot: T.let[T.int64] = SLOT[i]
                    if slot >= T.int64(0):
                        quantize(K, KC, KS, xin, xq, out, i, h, d0, slot)
                        quantize(V, VC, VS, xin, xq, out, i, h, d0, slot)

    return finish(WRITE_KV, cfg, write_kv)


def build_copy_pages_cuda(cfg: KernelConfig, target=None, **knobs):
    """Return the copy_pages PrimFunc for ``cfg`` on a CUDA target (knobs: see :func:`page_ops_plan`).

    Its parameters are :data:`tvm_paged.spec.COPY_PAGES`'s (``dtype`` = ``cfg.dtype``, the caches'; ``P``, ``C``
    symbolic): k_cache, v_cache [P, S, Hkv, D] (written in place; bytes for an 8-bit cache); src_pages, dst_pages
    [C] int32.
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

    return finish(COPY_PAGES, cfg, copy_pages)
