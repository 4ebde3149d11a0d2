"""KV write and page copy for CPUs: the in-place cache updates that precede attention.

    write_kv:   k, v [num_tokens, num_kv_heads, head_dim] dtype; k_cache, v_cache
                [num_pages, page_size, num_kv_heads, head_dim] dtype (written); slot_mapping [num_tokens] int64,
                slot = page * page_size + offset, -1 = skip (a padding token).
    copy_pages: k_cache, v_cache (written); src_pages, dst_pages [num_copies] int32: whole pages, both caches.

    8-bit caches (uint8 codes): write_kv also takes k_scale, v_scale [num_kv_heads] float32 and stores
    ``fp8_narrow(float(k) / k_scale)``; copy_pages copies the bytes.

Both are memory copies parallel over tokens (pages); the caller validates indices and forbids overlaps.
"""

from __future__ import annotations

from ..config import FP8_MAX, KernelConfig
from ..spec import WRITE_KV
from ..tvm_compat import T
from .common import f32_quotient, fp8_narrow, to_f32
from .signatures import copy_pages_args, finish, write_kv_args


def build_write_kv_cpu(cfg: KernelConfig):
    Hkv, D, S = cfg.num_kv_heads, cfg.head_dim, cfg.page_size
    a = write_kv_args(cfg)
    N = a.N

    def store(x, scale):
        """The cache's element for input ``x``: itself, or the 8-bit code of ``x / scale``, the quotient rounded as
        IEEE division rounds it (``f32_quotient``: a value halfway between two codes rounds as torch's conversion
        does, whatever the target's fast-math)."""
        if cfg.is_fp8:
            fmax = FP8_MAX[cfg.kv_dtype]
            return fp8_narrow(f32_quotient(to_f32(x, cfg.dtype), scale, fmax), cfg.kv_dtype, fmax)
        return x

    @T.prim_func
    def write_kv(K: a.k, V: a.v, KC: a.k_cache, VC: a.v_cache, SLOT: a.slot_mapping, KS: a.k_scale,
                 VS: a.v_scale):
        T.func_attr({"global_symbol": cfg.name, "tirx.noalias": True})
        for i in T.parallel(N):
            slot: T.let[T.int64] = SLOT[i]
            if slot >= T.int64(0):
                for h, d in T.grid(Hkv, D):
                    KC[slot // S, slot % S, h, d] = store(K[i, h, d], KS[h])
                    VC[slot // S, slot % S, h, d] = store(V[i, h, d], VS[h])

    return finish(WRITE_KV, cfg, write_kv)


def build_copy_pages_cpu(cfg: KernelConfig):
    Hkv, D, S = cfg.num_kv_heads, cfg.head_dim, cfg.page_size
    a = copy_pages_args(cfg)
    C = a.C

    @T.prim_func
    def copy_pages(KC: a.k_cache, VC: a.v_cache, SRC: a.src_pages, DST: a.dst_pages):
        T.func_attr({"global_symbol": cfg.name, "tirx.noalias": True})
        for i in T.parallel(C):
            src: T.int64 = T.Cast("int64", SRC[i])
            dst: T.int64 = T.Cast("int64", DST[i])
            for t, h, d in T.grid(S, Hkv, D):
                KC[dst, t, h, d] = KC[src, t, h, d]
                VC[dst, t, h, d] = VC[src, t, h, d]

    return copy_pages
