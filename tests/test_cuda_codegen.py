"""The CUDA kernels without a GPU.

1. Codegen: each kernel of a representative grid of configs builds through ``build.compile_kernel`` for
   ``nvidia/nvidia-h100`` (sm_90a) and ``nvidia/jetson-orin-nano`` (sm_87) into a CUDA device module whose source
   defines the expected ``__global__`` kernels (a kernel with no thread bindings would silently become host code).
2. nvcc: a subset of those sources compiles to a cubin for the target's architecture (skipped without nvcc).
3. Limits: impossible launch configurations raise ValueError before any compile; every supported config has a
   feasible default plan.
4. Numerics: the generated CUDA source of a few configs runs on the CPU in a small emulator
   (``tests/cuda_emulator.py``) and is compared with the float64 reference.

Variant configs (sliding window, soft-cap, ALiBi, sinks, 8-bit e4m3 / e5m2 caches) go through all four: their
kernels take exactly their spec's parameters, a plain kernel's code holds none of the variants' work, and the
emulated kernels match the reference (fp8 caches made by quantizing random data), skip the keys before the
window, are bitwise batch-invariant with ``split_pages > 0`` and quantize bitwise like torch.
"""

from __future__ import annotations

import functools
import re
import shutil
import sys

import numpy as np
import pytest
import torch

from tvm_paged import build, targets, reference
from tvm_paged.config import FP8_DTYPES, KernelConfig
from tvm_paged.kernels import build_kernel, knob_space
from tvm_paged.kernels.decode_cuda import decode_plan
from tvm_paged.kernels.page_ops_cuda import page_ops_plan
from tvm_paged.kernels.prefill_cuda import knob_space as prefill_knob_space
from tvm_paged.kernels.prefill_cuda import prefill_plan
from tvm_paged.spec import SPECS
from tvm_paged.tvm_compat import Target, buffer_signature, compile_cuda_with_nvcc

from cuda_emulator import Emulated
from paged_data import ATOL, LSE_ATOL, assert_close, make_pool

TARGETS = {"nvidia/nvidia-h100": "sm_90a", "nvidia/jetson-orin-nano": "sm_87"}
TDT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _att(kernel, dtype, hq, hkv, d, p, kv_dtype=None, variants=""):
    """An attention config; ``variants``: name tags (``"w_cap_alibi_sink"``)."""
    tags = set(variants.split("_")) - {""}
    return KernelConfig(kernel, dtype, hq, hkv, d, p, kv_dtype, window="w" in tags, soft_cap="cap" in tags,
                        alibi="alibi" in tags, sinks="sink" in tags)


def _pages(kernel, dtype, hkv, d, p, kv_dtype=None):
    return KernelConfig.for_pages(kernel, dtype, hkv, d, p, kv_dtype)


E4M3, E5M2 = "float8_e4m3fn", "float8_e5m2"
ALL = "w_cap_alibi_sink"


# (config, targets whose source also goes through nvcc). Dtypes f32/f16/bf16, head_dim 64/80/128/256,
# page 1/5/16, group 1/4/6/8 and MQA, each kernel at least once per target through nvcc.
H100, ORIN = "nvidia/nvidia-h100", "nvidia/jetson-orin-nano"
GRID = [
    (_att("decode", "float16", 32, 8, 128, 16), (H100, ORIN)),
    (_att("decode", "bfloat16", 24, 4, 80, 5), (H100,)),
    (_att("decode", "float32", 8, 8, 256, 1), (ORIN,)),
    (_att("decode", "float16", 64, 8, 64, 16), ()),
    (_att("decode", "bfloat16", 32, 1, 128, 16), ()),
    (_att("prefill", "float16", 32, 8, 128, 16), (H100, ORIN)),
    (_att("prefill", "bfloat16", 24, 4, 80, 5), (ORIN,)),
    (_att("prefill", "float32", 8, 8, 256, 1), (H100,)),
    (_att("prefill", "float16", 32, 1, 64, 16), ()),
    (_pages("write_kv", "float16", 8, 128, 16), (H100, ORIN)),
    (_pages("write_kv", "bfloat16", 2, 80, 5), ()),
    (_pages("write_kv", "float32", 1, 256, 1), ()),
    (_pages("copy_pages", "float32", 4, 64, 1), (H100, ORIN)),
    (_pages("copy_pages", "bfloat16", 2, 80, 5), ()),
    # Variants: every option, 8-bit caches of both formats under float16 and bfloat16 q, and mixes.
    (_att("decode", "float16", 32, 8, 128, 16, variants=ALL), (ORIN,)),
    (_att("decode", "float16", 32, 8, 128, 16, E4M3), ()),
    (_att("decode", "bfloat16", 24, 4, 80, 5, E5M2, "w_sink"), (ORIN,)),
    (_att("decode", "float16", 32, 8, 128, 16, E4M3, ALL), (H100,)),
    (_att("decode", "bfloat16", 8, 8, 256, 1, E4M3, "cap_alibi"), ()),
    (_att("decode", "float16", 32, 1, 64, 16, E5M2, "w"), ()),
    (_att("prefill", "float16", 32, 8, 128, 16, variants=ALL), (H100,)),
    (_att("prefill", "bfloat16", 24, 4, 80, 5, E4M3), ()),
    (_att("prefill", "float16", 8, 8, 256, 1, E5M2, "w_alibi"), (ORIN,)),
    (_att("prefill", "bfloat16", 32, 8, 128, 16, E4M3, ALL), (H100,)),
    (_pages("write_kv", "float16", 8, 128, 16, E4M3), (H100, ORIN)),
    (_pages("write_kv", "bfloat16", 2, 80, 5, E5M2), ()),
    (_pages("write_kv", "float32", 1, 256, 1, E4M3), ()),
    (_pages("copy_pages", E4M3, 4, 64, 1), (H100,)),
    (_pages("copy_pages", E5M2, 2, 80, 5), ()),
]
KERNELS_PER_FUNC = {"decode": 2, "prefill": 1, "write_kv": 1, "copy_pages": 1}


@functools.lru_cache(maxsize=None)
def _compiled(name: str, tag: str):
    """(runtime module, CUDA source) of one config on one target, compiled once per test session."""
    ex = build.compile_kernel(KernelConfig.from_name(name), Target(tag))
    return ex.mod


def _cuda_source(mod) -> str:
    cuda = [m for m in mod.imports if m.kind == "cuda"]
    assert cuda, f"no CUDA device module among the imports ({[m.kind for m in mod.imports]}): host code only?"
    return cuda[0].inspect_source("cuda")


CODEGEN_CASES = [pytest.param(cfg.name, tag, id=f"{cfg.name}-{TARGETS[tag]}") for cfg, _ in GRID for tag in TARGETS]
NVCC_CASES = [pytest.param(cfg.name, tag, id=f"{cfg.name}-{TARGETS[tag]}") for cfg, tags in GRID for tag in tags]


@pytest.mark.parametrize("name,tag", CODEGEN_CASES)
def test_codegen_is_cuda(name, tag):
    mod = _compiled(name, tag)
    src = _cuda_source(mod)
    kernels = re.findall(r'extern "C" __global__ void __launch_bounds__\((\d+)\) (\w+)\(', src)
    # Declarations and definitions: each kernel appears twice.
    names = sorted({k for _, k in kernels})
    launches = KERNELS_PER_FUNC[KernelConfig.from_name(name).kernel]
    expected = [f"{name}_kernel"] + [f"{name}_kernel_{i}" for i in range(1, launches)]
    assert names == sorted(expected), names
    for bound, kname in kernels:
        assert 0 < int(bound) <= 1024, f"{kname}: block of {bound} threads"
        if kname == f"{name}_kernel":  # the kernel with warp shuffles runs whole warps
            assert int(bound) % 32 == 0, f"{kname}: block of {bound} threads"
    # The host entry exists under the config's name.
    assert mod.implements_function(name)


# What each variant's parameters are called inside the kernels (absent from a kernel without the variant).
VARIANT_NAMES = {"window_left": "window_left", "logits_soft_cap": "logits_soft_cap", "alibi_slopes": "ALIBI",
                 "sinks": "SINKS", "k_scale": "KS", "v_scale": "VS"}


@pytest.mark.parametrize("name", sorted({cfg.name for cfg, _ in GRID}))
def test_signature_follows_spec(name):
    """A kernel takes exactly its config's parameters of the spec, in order and of the spec's dtypes, and its
    CUDA code mentions a variant's arguments only when it has the variant (a plain kernel has none of them)."""
    cfg = KernelConfig.from_name(name)
    spec = SPECS[cfg.kernel]
    sig = buffer_signature(build_kernel(cfg, targets.with_host(Target(H100))))
    params = spec.params_for(cfg)
    assert [p["dtype"] for p in sig] == [spec.dtype_of(p.name, cfg) for p in params], (sig, params)
    src = _cuda_source(_compiled(name, H100))
    for p in spec.params:
        if p.name in VARIANT_NAMES:
            used = re.search(rf"\b{VARIANT_NAMES[p.name]}(_ptr)?\b", src) is not None
            assert used == p.present(cfg), f"{name}: {p.name} {'missing' if p.present(cfg) else 'compiled in'}"


@pytest.mark.parametrize("name,tag", NVCC_CASES)
def test_nvcc_cubin(name, tag):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH")
    src = _cuda_source(_compiled(name, tag))
    arch = TARGETS[tag]
    cubin = compile_cuda_with_nvcc(src, Target(tag), arch)
    assert len(cubin) > 64 and cubin[:4] == b"\x7fELF", "not an ELF cubin"
    assert int.from_bytes(cubin[18:20], "little") == 190, "ELF machine is not CUDA"
    sm = int(arch[3:5])
    flags = int.from_bytes(cubin[48:52], "little")
    assert sm in ((flags >> 8) & 0xFF, flags & 0xFF), f"cubin SM flags {flags:#x} do not say sm_{sm}"
    assert f"{name}_kernel".encode() in cubin


# --------------------------------------------------------------------------------------------- limits
def test_limits_raise_value_error():
    h100 = Target(H100)
    dec = _att("decode", "float32", 32, 8, 256, 16)
    with pytest.raises(ValueError, match="threads per block"):
        decode_plan(dec, h100, num_threads=2048)
    with pytest.raises(ValueError, match="shared memory"):  # 16 merge slots x 4 heads x 256 x 4 B = 64 KiB
        decode_plan(dec, h100, num_threads=1024, heads_per_block=4)
    with pytest.raises(ValueError, match="divide"):
        decode_plan(dec, h100, heads_per_block=3)
    with pytest.raises(ValueError, match="power of two"):
        decode_plan(dec, h100, vec=3)
    with pytest.raises(ValueError, match="warp"):
        decode_plan(dec, h100, vec=2)  # 128 lanes for head_dim 256
    pre = _att("prefill", "float32", 32, 8, 256, 16)
    with pytest.raises(ValueError, match="shared memory"):
        prefill_plan(pre, h100, kv_tile=64)  # 2 x 64 x 256 x 4 B = 128 KiB
    with pytest.raises(ValueError, match="tokens_per_step"):
        prefill_plan(pre, h100, kv_tile=6, tokens_per_step=4)
    small = Target({"kind": "cuda", "arch": "sm_87", "max_num_threads": 64, "thread_warp_size": 32,
                    "max_shared_memory_per_block": 8192})
    with pytest.raises(ValueError):
        decode_plan(dec, small, num_threads=128)
    with pytest.raises(ValueError, match="shared memory"):
        prefill_plan(pre, small, kv_tile=8)
    with pytest.raises(ValueError):
        page_ops_plan(_pages("write_kv", "float16", 8, 128, 16), h100, num_threads=48)
    # The builders check too (the tuner calls them with knobs).
    with pytest.raises(ValueError):
        build_kernel(dec, targets.with_host(h100), num_threads=2048)


@pytest.mark.parametrize("tag", list(TARGETS))
def test_default_plans_fit(tag):
    """Every supported shape has a feasible default on both targets (no compile: plans only)."""
    tgt = Target(tag)
    for dtype in TDT:
        for kv_dtype in (None, *FP8_DTYPES):
            for d in (64, 80, 96, 128, 256):
                for hq, hkv in ((8, 8), (32, 8), (24, 4), (64, 8), (32, 1), (7, 7), (12, 1)):
                    for p in (1, 5, 8, 16, 32):
                        for kernel, plan in (("decode", decode_plan), ("prefill", prefill_plan)):
                            pl = plan(_att(kernel, dtype, hq, hkv, d, p, kv_dtype), tgt)
                            assert pl["num_threads"] % 32 == 0 and pl["num_threads"] <= 1024
                            assert pl["shared_bytes"] <= 48 * 1024
                            if kv_dtype:  # 16-byte loads of 8-bit caches: 16 codes (or all a lane holds)
                                assert pl["lanes"] == min(pl["vec"], 16)
                        page_ops_plan(_pages("write_kv", dtype, hkv, d, p, kv_dtype), tgt)
                        if kv_dtype and dtype == "float16":
                            page_ops_plan(_pages("copy_pages", kv_dtype, hkv, d, p), tgt)


@pytest.mark.parametrize("tag", list(TARGETS))
def test_knob_spaces(tag):
    """The tuner may pick any point: every combination plans, and the first point is the builder's default."""
    import itertools  # noqa: PLC0415

    tgt = Target(tag)
    for dtype, hq, hkv, d, p, kv in (("float32", 32, 8, 256, 16, None), ("float16", 32, 8, 128, 16, None),
                                     ("bfloat16", 24, 4, 80, 5, None), ("float16", 32, 1, 64, 1, None),
                                     ("float16", 32, 8, 128, 16, E4M3), ("bfloat16", 8, 8, 256, 1, E5M2),
                                     ("float32", 24, 4, 80, 5, E4M3)):
        for kernel, space_fn, plan in (("decode", knob_space, decode_plan),
                                       ("prefill", prefill_knob_space, prefill_plan)):
            cfg = _att(kernel, dtype, hq, hkv, d, p, kv)
            space = space_fn(cfg, tgt)
            assert space and all(space.values()), space
            for combo in itertools.product(*space.values()):
                plan(cfg, tgt, **dict(zip(space, combo)))
            first = {k: v[0] for k, v in space.items()}
            assert plan(cfg, tgt, **first) == plan(cfg, tgt), (cfg.name, first)


@pytest.mark.parametrize("kernel", ["decode", "prefill"])
def test_variant_builds_at_every_knob_value(kernel):
    """Every value the knob space offers builds with every option on (the variants add no shared memory, so the
    space's feasibility is the plain kernel's): each knob's values in turn, the others at their defaults."""
    tgt = targets.with_host(Target(H100))
    cfg = _att(kernel, "float16", 24, 4, 80, 5, E4M3, ALL)
    space = knob_space(cfg, tgt)
    assert space == knob_space(_att(kernel, "float16", 24, 4, 80, 5, E4M3), tgt)
    for knob, values in space.items():
        for value in values[1:]:
            build_kernel(cfg, tgt, **{knob: value})


@pytest.fixture(scope="module")
def emulate(tmp_path_factory):
    if sys.platform != "linux" or shutil.which("g++") is None:
        pytest.skip("the CUDA emulator needs Linux (ucontext) and g++")
    workdir = str(tmp_path_factory.mktemp("cuda_emu"))
    target = targets.with_host(Target(H100))

    def run(cfg, tensors, scalars, **knobs):
        Emulated(build_kernel(cfg, target, **knobs), target, workdir)(tensors, scalars)

    return run


def _decode_case(emulate, cfg, seq_lens, num_splits, *, scale=None, q=None, pool=None, **knobs):
    if pool is None:
        pool = make_pool(seq_lens, page_size=cfg.page_size, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                         dtype=cfg.dtype)
    kc, vc, bt, sl = pool
    b, hq, d = len(seq_lens), cfg.num_qo_heads, cfg.head_dim
    if q is None:
        q = torch.randn(b, hq, d, generator=torch.Generator().manual_seed(5)).to(TDT[cfg.dtype])
    scale = d ** -0.5 if scale is None else scale
    out = torch.full_like(q, 777.0)
    lse = torch.full((b, hq), 777.0)
    o_part = torch.full((b, num_splits, hq, d), 777.0)
    ms_part = torch.full((b, num_splits, hq, 2), 777.0)
    emulate(cfg, {"Q": q, "K": kc, "V": vc, "BT": bt, "SL": sl, "O": out, "LSE": lse, "OP": o_part, "LP": ms_part},
            {"B": b, "P": kc.shape[0], "M": bt.shape[1], "NS": num_splits, "scale": scale, "split_pages": 0}, **knobs)
    ref_out, ref_lse = reference.decode(q, kc, vc, bt.numpy(), sl.numpy(), scale=scale)
    return out, lse, ref_out, ref_lse


DECODE_EMU = [
    # dtype, hq, hkv, head_dim, page, seq_lens, splits, knobs
    ("float32", 8, 2, 64, 16, [37, 5, 32], 3, {}),
    ("float16", 24, 4, 80, 5, [1, 23, 40], 4, {}),  # group 6, head_dim 80 (10 of 16 lanes active)
    ("bfloat16", 12, 2, 96, 1, [7, 3], 8, {}),  # empty splits
    ("float16", 32, 1, 64, 16, [70, 1], 2, {}),  # MQA: 8 head groups of 4
    ("float32", 4, 4, 256, 8, [33], 1, {"num_threads": 64, "tokens_per_iter": 1}),
    # batch 17, page 5: page-edge and odd lengths up to 97
    ("float16", 8, 2, 64, 5, [1, 2, 5, 6, 20, 21, 54, 97, 33, 4, 10, 11, 96, 98, 3, 60, 97], 3, {}),
]


@pytest.mark.parametrize("dtype,hq,hkv,d,page,lens,splits,knobs", DECODE_EMU,
                         ids=[f"{c[0]}-h{c[1]}x{c[2]}-d{c[3]}-p{c[4]}-ns{c[6]}" for c in DECODE_EMU])
def test_emulated_decode(emulate, dtype, hq, hkv, d, page, lens, splits, knobs):
    cfg = _att("decode", dtype, hq, hkv, d, page)
    out, lse, ref_out, ref_lse = _decode_case(emulate, cfg, lens, splits, **knobs)
    assert torch.isfinite(out.float()).all() and torch.isfinite(lse).all()
    assert_close(out, ref_out, ATOL[dtype])
    assert_close(lse, ref_lse, LSE_ATOL[dtype], "lse")


def test_emulated_decode_huge_negative_logits(emulate):
    """Logits near -5e5 (a -5e4 start of the running max would lose them all): one key dominates, so the
    output is that key's value row, and a single-key sequence returns its V exactly."""
    cfg = _att("decode", "float32", 4, 2, 64, 5)
    lens = [1, 9]
    kc, vc, bt, sl = make_pool(lens, page_size=5, num_kv_heads=2, head_dim=64, dtype="float32")
    q = torch.zeros(2, 4, 64)
    q[:, :, 0] = 1000.0
    for b, n in enumerate(lens):
        for t in range(n):
            page, slot = int(bt[b, t // 5]), t % 5
            kc[page, slot, :, 0] = -500.0 if t != n // 2 else -499.0  # logits -5e5, one at -4.99e5
    out, lse, ref_out, ref_lse = _decode_case(emulate, cfg, lens, 2, scale=1.0, q=q, pool=(kc, vc, bt, sl))
    for b, n in enumerate(lens):
        t = n // 2
        torch.testing.assert_close(out[b], vc[int(bt[b, t // 5]), t % 5].repeat_interleave(2, 0), atol=0, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=0.1, rtol=0)  # float32 logits near 5e5: ulp 0.03


PREFILL_EMU = [
    # dtype, hq, hkv, head_dim, page, seq_lens, q_lens, causal, tile rows, knobs
    ("float32", 8, 2, 64, 16, [37, 5], [20, 5], True, 16, {}),
    ("float16", 24, 4, 80, 5, [1, 23, 36], [1, 7, 20], True, 16, {}),  # chunked prefill, group 6
    ("bfloat16", 12, 2, 96, 1, [7, 30], [3, 17], False, 16, {}),
    ("float16", 8, 1, 128, 8, [50], [33], True, 40, {"kv_tile": 8, "tokens_per_step": 2}),  # tile > 16 rows
    # batch 17, page 5: whole prompts, chunks and single rows over lengths up to 97
    ("float32", 4, 2, 64, 5, [1, 2, 5, 6, 20, 21, 54, 97, 33, 4, 10, 11, 96, 98, 3, 60, 97],
     [1, 1, 5, 2, 20, 3, 17, 97, 1, 4, 9, 11, 5, 40, 3, 1, 30], True, 16, {}),
]


@pytest.mark.parametrize("dtype,hq,hkv,d,page,lens,q_lens,causal,tile,knobs", PREFILL_EMU,
                         ids=[f"{c[0]}-h{c[1]}x{c[2]}-d{c[3]}-p{c[4]}-{'causal' if c[7] else 'full'}"
                              for c in PREFILL_EMU])
def test_emulated_prefill(emulate, dtype, hq, hkv, d, page, lens, q_lens, causal, tile, knobs):
    cfg = _att("prefill", dtype, hq, hkv, d, page)
    kc, vc, bt, sl = make_pool(lens, page_size=page, num_kv_heads=hkv, head_dim=d, dtype=dtype)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(q_lens)]), dtype=torch.int32)
    total = int(cu[-1])
    q = torch.randn(total, hq, d, generator=torch.Generator().manual_seed(7)).to(TDT[dtype])
    tiles = torch.tensor([(b, r, min(r + tile, n)) for b, n in enumerate(q_lens) for r in range(0, n, tile)],
                         dtype=torch.int32).reshape(-1, 3)
    out = torch.full_like(q, 777.0)
    lse = torch.full((total, hq), 777.0)
    scale = d ** -0.5
    emulate(cfg, {"Q": q, "K": kc, "V": vc, "BT": bt, "SL": sl, "CU": cu, "TILES": tiles, "O": out, "LSE": lse},
            {"B": len(lens), "P": kc.shape[0], "M": bt.shape[1], "TQ": total, "NT": tiles.shape[0], "scale": scale,
             "causal": int(causal)}, **knobs)
    ref_out, ref_lse = reference.prefill(q, kc, vc, bt.numpy(), sl.numpy(), cu.numpy(), scale=scale, causal=causal)
    assert_close(out, ref_out, ATOL[dtype])
    assert_close(lse, ref_lse, LSE_ATOL[dtype], "lse")


@pytest.mark.parametrize("dtype,hkv,d,page", [("float16", 2, 80, 5), ("float32", 3, 64, 1)])
def test_emulated_page_ops(emulate, dtype, hkv, d, page):
    gen = torch.Generator().manual_seed(3)
    num_pages, n = (7, 9) if page > 1 else (20, 9)
    kc = torch.randn(num_pages, page, hkv, d, generator=gen).to(TDT[dtype])
    vc = torch.randn(num_pages, page, hkv, d, generator=gen).to(TDT[dtype])
    k = torch.randn(n, hkv, d, generator=gen).to(TDT[dtype])
    v = torch.randn(n, hkv, d, generator=gen).to(TDT[dtype])
    slots = torch.randperm(num_pages * page, generator=gen)[:n].long()
    slots[3] = -1
    want_k, want_v = kc.clone(), vc.clone()
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            want_k[s // page, s % page], want_v[s // page, s % page] = k[i], v[i]
    emulate(_pages("write_kv", dtype, hkv, d, page), {"K": k, "V": v, "KC": kc, "VC": vc, "SLOT": slots},
            {"N": n, "P": num_pages})
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    src, dst = torch.tensor([0, 5, 2], dtype=torch.int32), torch.tensor([6, 1, 3], dtype=torch.int32)
    want_k[dst.long()], want_v[dst.long()] = kc[src.long()], vc[src.long()]
    emulate(_pages("copy_pages", dtype, hkv, d, page), {"KC": kc, "VC": vc, "SRC": src, "DST": dst},
            {"C": 3, "P": num_pages})
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


# ------------------------------------------------------------------------------- variants in the emulator
def _variant_pool(cfg, seq_lens, first_keys, gen, seed=0):
    """A pool for ``cfg`` from make_pool (NaN in every unused slot) with the keys before each sequence's first
    visible key (``first_keys``) NaN too, so a kernel that read them would return NaN; in q's dtype, or quantized
    to ``cfg``'s 8-bit format with random per-KV-head scales. Returns (the kernel's cache tensors, the reference's
    caches and options, block_table, seq_lens)."""
    kc, vc, bt, sl = make_pool(seq_lens, page_size=cfg.page_size, num_kv_heads=cfg.num_kv_heads,
                               head_dim=cfg.head_dim, dtype="float32", seed=seed)
    for b, first in enumerate(first_keys):
        for t in range(first):
            page, slot = int(bt[b, t // cfg.page_size]), t % cfg.page_size
            kc[page, slot], vc[page, slot] = float("nan"), float("nan")
    if not cfg.is_fp8:
        kc, vc = kc.to(TDT[cfg.dtype]), vc.to(TDT[cfg.dtype])
        return {"K": kc, "V": vc}, (kc, vc, {}), bt, sl
    f8, shape = getattr(torch, cfg.kv_dtype), kc.shape
    ks = 0.01 + 0.05 * torch.rand(cfg.num_kv_heads, generator=gen)
    vs = 0.01 + 0.05 * torch.rand(cfg.num_kv_heads, generator=gen)
    kq = reference.quantize_kv(kc.reshape(-1, *shape[2:]), f8, ks).reshape(shape)
    vq = reference.quantize_kv(vc.reshape(-1, *shape[2:]), f8, vs).reshape(shape)
    return ({"K": kq.view(torch.uint8), "V": vq.view(torch.uint8), "KS": ks, "VS": vs},
            (kq, vq, {"k_scale": ks, "v_scale": vs}), bt, sl)


def _variant_options(cfg, gen, window_left):
    """(kernel tensors, kernel scalars, reference options) of ``cfg``'s attention options."""
    tensors, scalars, opts = {}, {}, {}
    hq = cfg.num_qo_heads
    if cfg.window:
        scalars["window_left"] = opts["window_left"] = window_left
    if cfg.soft_cap:
        scalars["logits_soft_cap"] = opts["logits_soft_cap"] = 1.5
    if cfg.alibi:  # the ALiBi paper's slopes, 2^(-8 h / Hq)
        tensors["ALIBI"] = opts["alibi_slopes"] = 2.0 ** (-8.0 * torch.arange(1, hq + 1) / hq)
    if cfg.sinks:
        tensors["SINKS"] = opts["sinks"] = 2.0 * torch.randn(hq, generator=gen)
    return tensors, scalars, opts


def _emulated_decode(emulate, cfg, cache, q, bt, sl, num_splits, split_pages, options, **knobs):
    b, hq, d = q.shape
    out = torch.full_like(q, 777.0)
    lse = torch.full((b, hq), 777.0)
    tensors = {**cache, **options[0], "Q": q, "BT": bt, "SL": sl, "O": out, "LSE": lse,
               "OP": torch.full((b, num_splits, hq, d), 777.0), "LP": torch.full((b, num_splits, hq, 2), 777.0)}
    emulate(cfg, tensors, {"B": b, "P": cache["K"].shape[0], "M": bt.shape[1], "NS": num_splits,
                           "scale": d ** -0.5, "split_pages": split_pages, **options[1]}, **knobs)
    return out, lse


def _decode_first_keys(cfg, lens, window_left):
    return [max(0, n - 1 - window_left) if cfg.window else 0 for n in lens]


DECODE_VARIANT_EMU = [
    # dtype, kv_dtype, hq, hkv, head_dim, page, variants, seq_lens, splits, split_pages, window_left
    ("float16", None, 8, 2, 80, 5, ALL, [37, 5, 23], 3, 0, 11),
    ("bfloat16", E4M3, 12, 4, 64, 16, "", [70, 1, 33], 2, 0, -1),
    ("float16", E5M2, 24, 4, 80, 5, "w_sink", [41, 7], 4, 2, 13),  # pages per split fixed, empty splits
    ("float32", E4M3, 8, 8, 64, 1, "cap_alibi", [17, 3], 4, 0, -1),  # page 1, MHA
    ("float16", E4M3, 32, 8, 128, 16, ALL, [100, 40], 1, 0, 50),  # one split: the sink enters in the merge
]


@pytest.mark.parametrize("dtype,kv_dtype,hq,hkv,d,page,variants,lens,splits,split_pages,window_left",
                         DECODE_VARIANT_EMU, ids=[f"{c[0]}-{c[1] or 'kv16'}-h{c[2]}x{c[3]}-d{c[4]}-p{c[5]}-"
                                                  f"{c[6] or 'plain'}-ns{c[8]}" for c in DECODE_VARIANT_EMU])
def test_emulated_decode_variants(emulate, dtype, kv_dtype, hq, hkv, d, page, variants, lens, splits, split_pages,
                                  window_left):
    """Decode with the options and 8-bit caches against the float64 reference; the keys before the window are
    NaN (never read)."""
    cfg = _att("decode", dtype, hq, hkv, d, page, kv_dtype, variants)
    gen = torch.Generator().manual_seed(17)
    cache, (ref_k, ref_v, ref_opts), bt, sl = _variant_pool(cfg, lens, _decode_first_keys(cfg, lens, window_left),
                                                            gen)
    options = _variant_options(cfg, gen, window_left)
    q = torch.randn(len(lens), hq, d, generator=gen).to(TDT[dtype])
    out, lse = _emulated_decode(emulate, cfg, cache, q, bt, sl, splits, split_pages, options)
    ref_out, ref_lse = reference.decode(q, ref_k, ref_v, bt, sl, scale=d ** -0.5, **ref_opts, **options[2])
    assert torch.isfinite(out.float()).all() and torch.isfinite(lse).all()
    assert_close(out, ref_out, ATOL[dtype])
    assert_close(lse, ref_lse, LSE_ATOL[dtype], "lse")


@pytest.mark.parametrize("name", ["decode_f16_h8x2_d64_p5", "decode_e4m3_bf16_h8x2_d64_p5_w_sink"])
def test_emulated_decode_batch_invariant(emulate, name):
    """With ``split_pages > 0`` a sequence's output and lse are bitwise the same alone (one split: the direct
    store) and in a batch whose longest sequence needs more splits (the merge, with empty splits)."""
    cfg = KernelConfig.from_name(name)
    lens, split_pages, window_left = [7, 23, 61], 2, 17
    gen = torch.Generator().manual_seed(23)
    cache, _, bt, sl = _variant_pool(cfg, lens, _decode_first_keys(cfg, lens, window_left), gen)
    options = _variant_options(cfg, gen, window_left)
    q = torch.randn(len(lens), cfg.num_qo_heads, cfg.head_dim, generator=gen).to(TDT[cfg.dtype])

    def run(rows):
        first = np.array(_decode_first_keys(cfg, [lens[r] for r in rows], window_left)) // cfg.page_size
        visible = -(-np.array([lens[r] for r in rows]) // cfg.page_size) - first
        splits = int((-(-visible // split_pages)).max())
        return splits, _emulated_decode(emulate, cfg, cache, q[rows].contiguous(), bt[rows].contiguous(),
                                        sl[rows].contiguous(), splits, split_pages, options)

    splits_all, (out_all, lse_all) = run([0, 1, 2])
    assert splits_all > 2
    for r in (0, 1):
        splits, (out, lse) = run([r])
        assert splits < splits_all
        assert torch.equal(out[0], out_all[r]) and torch.equal(lse[0], lse_all[r]), f"sequence {r}"


PREFILL_VARIANT_EMU = [
    # dtype, kv_dtype, hq, hkv, head_dim, page, variants, seq_lens, q_lens, causal, window_left, tile rows, knobs
    ("float16", None, 8, 2, 80, 5, ALL, [37, 5, 23], [20, 5, 9], True, 7, 16, {}),
    ("float32", None, 8, 2, 64, 5, "w_sink", [37, 30], [20, 17], False, 4, 16, {}),
    ("bfloat16", E4M3, 12, 4, 64, 16, "", [37, 5], [20, 3], True, -1, 16, {}),
    ("float16", E5M2, 8, 8, 64, 1, "w_alibi", [40, 9], [33, 9], True, 5, 40, {"kv_tile": 8, "tokens_per_step": 2}),
]


@pytest.mark.parametrize("dtype,kv_dtype,hq,hkv,d,page,variants,lens,q_lens,causal,window_left,tile,knobs",
                         PREFILL_VARIANT_EMU, ids=[f"{c[0]}-{c[1] or 'kv16'}-h{c[2]}x{c[3]}-d{c[4]}-p{c[5]}-"
                                                   f"{c[6] or 'plain'}-{'causal' if c[9] else 'full'}"
                                                   for c in PREFILL_VARIANT_EMU])
def test_emulated_prefill_variants(emulate, dtype, kv_dtype, hq, hkv, d, page, variants, lens, q_lens, causal,
                                   window_left, tile, knobs):
    """Chunked prefill with the options and 8-bit caches against the float64 reference; the keys before every
    query's window are NaN (never read)."""
    cfg = _att("prefill", dtype, hq, hkv, d, page, kv_dtype, variants)
    gen = torch.Generator().manual_seed(19)
    first = [max(0, n - ql - window_left) if cfg.window else 0 for n, ql in zip(lens, q_lens)]
    cache, (ref_k, ref_v, ref_opts), bt, sl = _variant_pool(cfg, lens, first, gen)
    tensors, scalars, opts = _variant_options(cfg, gen, window_left)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(q_lens)]), dtype=torch.int32)
    total = int(cu[-1])
    q = torch.randn(total, hq, d, generator=gen).to(TDT[dtype])
    tiles = torch.tensor([(b, r, min(r + tile, n)) for b, n in enumerate(q_lens) for r in range(0, n, tile)],
                         dtype=torch.int32).reshape(-1, 3)
    out = torch.full_like(q, 777.0)
    lse = torch.full((total, hq), 777.0)
    emulate(cfg, {**cache, **tensors, "Q": q, "BT": bt, "SL": sl, "CU": cu, "TILES": tiles, "O": out, "LSE": lse},
            {"B": len(lens), "P": cache["K"].shape[0], "M": bt.shape[1], "TQ": total, "NT": tiles.shape[0],
             "scale": d ** -0.5, "causal": int(causal), **scalars}, **knobs)
    ref_out, ref_lse = reference.prefill(q, ref_k, ref_v, bt, sl, cu, scale=d ** -0.5, causal=causal, **ref_opts,
                                         **opts)
    assert torch.isfinite(out.float()).all() and torch.isfinite(lse).all()
    assert_close(out, ref_out, ATOL[dtype])
    assert_close(lse, ref_lse, LSE_ATOL[dtype], "lse")


@pytest.mark.parametrize("dtype,kv_dtype,hkv,d,page", [("float16", E4M3, 3, 80, 5), ("bfloat16", E5M2, 2, 64, 1),
                                                       ("float32", E4M3, 1, 128, 4)])
def test_emulated_page_ops_fp8(emulate, dtype, kv_dtype, hkv, d, page):
    """write_kv into an 8-bit cache stores bitwise torch's ``(k.float() / scale).clamp(-max, max).to(float8)``
    (ties to even, subnormals, clamped overflow; -1 slots skipped); copy_pages copies the bytes."""
    f8 = getattr(torch, kv_dtype)
    gen = torch.Generator().manual_seed(29)
    num_pages, n = (7, 9) if page > 1 else (20, 9)
    kc = torch.randint(0, 256, (num_pages, page, hkv, d), generator=gen, dtype=torch.uint8)
    vc = torch.randint(0, 256, (num_pages, page, hkv, d), generator=gen, dtype=torch.uint8)
    spread = 10.0 ** torch.randint(-4, 4, (n, hkv, d), generator=gen)  # 1e-4 .. 1e3: subnormal to clamped
    k = (torch.randn(n, hkv, d, generator=gen) * spread).to(TDT[dtype])
    v = (torch.randn(n, hkv, d, generator=gen) * spread).to(TDT[dtype])
    # Ties between two codes times a scale of 7/64 whose reciprocal is inexact: a true division lands on the tie and
    # rounds it to even, a reciprocal multiply does not. Then zeros, overflow and an infinity (float16).
    ties = {E4M3: [0.390625, 0.453125, -0.78125, 1.5625, -1.8125],
            E5M2: [0.40625, -0.8125, 1.625, 3.25, -6.5]}[kv_dtype]
    k[0, 0, :9] = torch.tensor([t * 0.109375 for t in ties] + [0.0, -0.0, 1e4, -1e5])
    ks = torch.tensor([0.109375, 0.03, 2.5])[:hkv]
    vs = torch.tensor([0.5, 1.0, 0.02])[:hkv]
    slots = torch.randperm(num_pages * page, generator=gen)[:n].long()
    slots[3] = -1
    want_k, want_v = kc.clone(), vc.clone()
    qk = reference.quantize_kv(k, f8, ks).view(torch.uint8)
    qv = reference.quantize_kv(v, f8, vs).view(torch.uint8)
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            want_k[s // page, s % page], want_v[s // page, s % page] = qk[i], qv[i]
    emulate(_pages("write_kv", dtype, hkv, d, page, kv_dtype),
            {"K": k, "V": v, "KC": kc, "VC": vc, "SLOT": slots, "KS": ks, "VS": vs}, {"N": n, "P": num_pages})
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    src, dst = torch.tensor([0, 5, 2], dtype=torch.int32), torch.tensor([6, 1, 3], dtype=torch.int32)
    want_k[dst.long()], want_v[dst.long()] = kc[src.long()], vc[src.long()]
    emulate(_pages("copy_pages", kv_dtype, hkv, d, page), {"KC": kc, "VC": vc, "SRC": src, "DST": dst},
            {"C": 3, "P": num_pages})
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


# ------------------------------------------------------------------- MetaSchedule's CUDA paged-decode space
@pytest.mark.parametrize("heads,head_dim,page,dtype", [((7, 1), 80, 5, "float16"), ((2, 2), 80, 5, "float32"),
                                                       ((8, 2), 128, 16, "bfloat16")],
                         ids=["group7-d80-p5-f16", "mha-d80-p5-f32", "group4-d128-p16-bf16"])
def test_paged_space_cuda_samples_correct_kernels(emulate, tmp_path, heads, head_dim, page, dtype):
    """Candidates of the thread-bound paged decode space (``tuning.paged_space.decode_space_cuda``), as
    MetaSchedule's search would build them (the CUDA postprocessors applied and all accepting), run in the
    emulator against the float64 reference: odd shapes (a group of 7 and MHA, head_dim 80, page 5), NaN in every
    slot past a sequence's length, until every KV split count, token tile, vector width and softmax block size
    the space samples has run (head_dim 128 adds 4 elements per lane, page 16 the warp counts 2 to 8, bfloat16 its
    conversions). One candidate also compiles to an sm_90a cubin."""
    from tvm_paged import tvm_compat as tc
    from tvm_paged.kernels.decode_generic import build_decode_generic
    from tvm_paged.tuning.ms_glue import apply_postprocs
    from tvm_paged.tuning.paged_space import SOFTMAX_THREADS, decisions, decode_space_cuda

    target = targets.with_host(Target(H100))
    batch, max_pages, num_pages = 3, 4, 29
    cfg = _att("decode", dtype, *heads, head_dim, page)
    mod = tc.ir_module({"main": build_decode_generic(cfg, batch, max_pages, num_pages, weights=True)
                        .with_attr("global_symbol", "main")})
    gen = torch.Generator().manual_seed(11)
    shape = (num_pages, cfg.page_size, cfg.num_kv_heads, cfg.head_dim)
    k = torch.randn(shape, generator=gen).to(TDT[dtype])
    v = torch.randn(shape, generator=gen).to(TDT[dtype])
    table = torch.randperm(num_pages, generator=gen)[: batch * max_pages].view(batch, max_pages).int()
    seq_lens = torch.tensor([max_pages * page, 17, 1], dtype=torch.int32)  # a full table, a partial page, one token
    for b, n in enumerate(seq_lens.tolist()):  # NaN in the slots a sequence's table covers but it does not use
        for t in range(n, max_pages * cfg.page_size):
            page, slot = table[b, t // cfg.page_size].item(), t % cfg.page_size
            k[page, slot], v[page, slot] = float("nan"), float("nan")
    q = torch.randn(batch, cfg.num_qo_heads, cfg.head_dim, generator=gen).to(TDT[dtype])
    ref, _ = reference.decode(q, k, v, table, seq_lens)
    warps = [n for n in (1, 2, 4, 5, 8) if cfg.page_size % n == 0]
    want = ({("kv_splits", s) for s in (1, 2, 4)} | {("score_tokens", n) for n in warps}
            | {("score_vec", n) for n in ((1, 2, 4) if head_dim >= 128 else (1, 2))}
            | {("softmax_threads", n) for n in SOFTMAX_THREADS})
    seen: set = set()
    cubin_done = shutil.which("nvcc") is None
    for seed in range(1, 80):
        sch = tc.Schedule(mod, seed=seed)
        decode_space_cuda(cfg, max_pages)(sch)
        dec = decisions(sch.trace, "decode_cuda")
        dec["score_tokens"] = dec["score_tokens"][1]  # (pages' slot steps, warps): the warps
        new = {(name, dec[name]) for name in ("kv_splits", "score_tokens", "score_vec", "softmax_threads")} - seen
        if not new:
            continue
        seen |= new
        assert apply_postprocs(sch, target) == [], dec
        func = sch.mod["main"]
        out = torch.full_like(q, 777.0)
        Emulated(func, target, str(tmp_path))({"Q": q, "K": k, "V": v, "BT": table, "SL": seq_lens, "O": out}, {})
        assert_close(out, ref, ATOL[dtype], f"out {dec}")
        if not cubin_done:
            cubin = compile_cuda_with_nvcc(_cuda_source(tc.compile_module(func, target).mod), Target(H100), "sm_90a")
            assert cubin[:4] == b"\x7fELF"
            cubin_done = True
        if seen >= want:
            break
    assert seen >= want, f"the space never sampled {sorted(want - seen)}"
