"""KV write and page copy for CPUs: the in-place cache updates that precede attention.

    write_kv:   k, v [num_tokens, num_kv_heads, head_dim] dtype; k_cache, v_cache
                [num_pages, page_size, num_kv_heads, head_dim] dtype (written); slot_mapping [num_tokens] int64,
                slot = page * page_size + offset, -1 = skip (a padding token).
    copy_pages: k_cache, v_cache (written); src_pages, dst_pages [num_copies] int32: whole pages, both caches.

Both are memory copies parallel over tokens (pages); the caller validates indices and forbids overlaps.
"""

from __future__ import annotations

from ..config import KernelConfig
from ..tvm_compat import T


def build_write_kv_cpu(cfg: KernelConfig):
    Hkv, D, S, dt, E = cfg.num_kv_heads, cfg.head_dim, cfg.page_size, cfg.dtype, cfg.itemsize

    @T.prim_func
    def write_kv(k_h: T.handle, v_h: T.handle, kc_h: T.handle, vc_h: T.handle, slot_h: T.handle):
        T.func_attr({"global_symbol": cfg.name, "tirx.noalias": True})
        N = T.int64()
        P = T.int64()
        K = T.match_buffer(k_h, (N, Hkv, D), dt, align=E)
        V = T.match_buffer(v_h, (N, Hkv, D), dt, align=E)
        KC = T.match_buffer(kc_h, (P, S, Hkv, D), dt, align=E)
        VC = T.match_buffer(vc_h, (P, S, Hkv, D), dt, align=E)
        SLOT = T.match_buffer(slot_h, (N,), "int64", align=8)
        for i in T.parallel(N):
            slot: T.int64 = SLOT[i]
            if slot >= T.int64(0):
                for h, d in T.grid(Hkv, D):
                    KC[slot // S, slot % S, h, d] = K[i, h, d]
                    VC[slot // S, slot % S, h, d] = V[i, h, d]

    return write_kv


def build_copy_pages_cpu(cfg: KernelConfig):
    Hkv, D, S, dt, E = cfg.num_kv_heads, cfg.head_dim, cfg.page_size, cfg.dtype, cfg.itemsize

    @T.prim_func
    def copy_pages(kc_h: T.handle, vc_h: T.handle, src_h: T.handle, dst_h: T.handle):
        T.func_attr({"global_symbol": cfg.name, "tirx.noalias": True})
        P = T.int64()
        C = T.int64()
        KC = T.match_buffer(kc_h, (P, S, Hkv, D), dt, align=E)
        VC = T.match_buffer(vc_h, (P, S, Hkv, D), dt, align=E)
        SRC = T.match_buffer(src_h, (C,), "int32", align=4)
        DST = T.match_buffer(dst_h, (C,), "int32", align=4)
        for i in T.parallel(C):
            src: T.int64 = T.Cast("int64", SRC[i])
            dst: T.int64 = T.Cast("int64", DST[i])
            for t, h, d in T.grid(S, Hkv, D):
                KC[dst, t, h, d] = KC[src, t, h, d]
                VC[dst, t, h, d] = VC[src, t, h, d]

    return copy_pages
