"""The CUDA kernels without a GPU.

1. Codegen: each kernel of a representative grid of configs builds through ``build.compile_kernel`` for
   ``nvidia/nvidia-h100`` (sm_90a) and ``nvidia/jetson-orin-nano`` (sm_87) into a CUDA device module whose source
   defines the expected ``__global__`` kernels (a kernel with no thread bindings would silently become host code).
2. nvcc: a subset of those sources compiles to a cubin for the target's architecture (skipped without nvcc).
3. Limits: impossible launch configurations raise ValueError before any compile; every supported config has a
   feasible default plan.
4. Numerics: the generated CUDA source of a few configs runs on the CPU in a small emulator
   (``tests/cuda_emulator.py``) and is compared with the float64 reference.
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
from tvm_paged.config import KernelConfig
from tvm_paged.kernels import build_kernel, knob_space
from tvm_paged.kernels.decode_cuda import decode_plan
from tvm_paged.kernels.page_ops_cuda import page_ops_plan
from tvm_paged.kernels.prefill_cuda import knob_space as prefill_knob_space
from tvm_paged.kernels.prefill_cuda import prefill_plan
from tvm_paged.tvm_compat import Target, compile_cuda_with_nvcc

from cuda_emulator import Emulated
from paged_data import ATOL, LSE_ATOL, make_pool

TARGETS = {"nvidia/nvidia-h100": "sm_90a", "nvidia/jetson-orin-nano": "sm_87"}
TDT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _att(kernel, dtype, hq, hkv, d, p):
    return KernelConfig(kernel, dtype, hq, hkv, d, p)


def _pages(kernel, dtype, hkv, d, p):
    return KernelConfig.for_pages(kernel, dtype, hkv, d, p)


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
        for d in (64, 80, 96, 128, 256):
            for hq, hkv in ((8, 8), (32, 8), (24, 4), (64, 8), (32, 1), (7, 7), (12, 1)):
                for p in (1, 5, 8, 16, 32):
                    for kernel, plan in (("decode", decode_plan), ("prefill", prefill_plan)):
                        pl = plan(_att(kernel, dtype, hq, hkv, d, p), tgt)
                        assert pl["num_threads"] % 32 == 0 and pl["num_threads"] <= 1024
                        assert pl["shared_bytes"] <= 48 * 1024
                    page_ops_plan(_pages("write_kv", dtype, hkv, d, p), tgt)


@pytest.mark.parametrize("tag", list(TARGETS))
def test_knob_spaces(tag):
    """The tuner may pick any point: every combination plans, and the first point is the builder's default."""
    import itertools  # noqa: PLC0415

    tgt = Target(tag)
    for dtype, hq, hkv, d, p in (("float32", 32, 8, 256, 16), ("float16", 32, 8, 128, 16), ("bfloat16", 24, 4, 80, 5),
                                 ("float16", 32, 1, 64, 1)):
        for kernel, space_fn, plan in (("decode", knob_space, decode_plan),
                                       ("prefill", prefill_knob_space, prefill_plan)):
            cfg = _att(kernel, dtype, hq, hkv, d, p)
            space = space_fn(cfg, tgt)
            assert space and all(space.values()), space
            for combo in itertools.product(*space.values()):
                plan(cfg, tgt, **dict(zip(space, combo)))
            first = {k: v[0] for k, v in space.items()}
            assert plan(cfg, tgt, **first) == plan(cfg, tgt), (cfg.name, first)


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
    lse_part = torch.full((b, num_splits, hq), 777.0)
    emulate(cfg, {"Q": q, "K": kc, "V": vc, "BT": bt, "SL": sl, "O": out, "LSE": lse, "OP": o_part, "LP": lse_part},
            {"B": b, "P": kc.shape[0], "M": bt.shape[1], "NS": num_splits, "scale": scale}, **knobs)
    ref_out, ref_lse = reference.decode(q, kc, vc, bt.numpy(), sl.numpy(), scale=scale)
    return out, lse, ref_out, ref_lse


DECODE_EMU = [
    # dtype, hq, hkv, head_dim, page, seq_lens, splits, knobs
    ("float32", 8, 2, 64, 16, [37, 5, 32], 3, {}),
    ("float16", 24, 4, 80, 5, [1, 23, 40], 4, {}),  # group 6, head_dim 80 (10 of 16 lanes active)
    ("bfloat16", 12, 2, 96, 1, [7, 3], 8, {}),  # empty splits
    ("float16", 32, 1, 64, 16, [70, 1], 2, {}),  # MQA: 8 head groups of 4
    ("float32", 4, 4, 256, 8, [33], 1, {"num_threads": 64, "tokens_per_iter": 1}),
]


@pytest.mark.parametrize("dtype,hq,hkv,d,page,lens,splits,knobs", DECODE_EMU,
                         ids=[f"{c[0]}-h{c[1]}x{c[2]}-d{c[3]}-p{c[4]}-ns{c[6]}" for c in DECODE_EMU])
def test_emulated_decode(emulate, dtype, hq, hkv, d, page, lens, splits, knobs):
    cfg = _att("decode", dtype, hq, hkv, d, page)
    out, lse, ref_out, ref_lse = _decode_case(emulate, cfg, lens, splits, **knobs)
    assert torch.isfinite(out.float()).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out.double(), ref_out, atol=ATOL[dtype], rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=LSE_ATOL[dtype], rtol=0)


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
    torch.testing.assert_close(out.double(), ref_out, atol=ATOL[dtype], rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=LSE_ATOL[dtype], rtol=0)


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
        torch.testing.assert_close(out.double(), ref, atol=ATOL[dtype], rtol=0, msg=lambda m: f"{dec}: {m}")
        if not cubin_done:
            cubin = compile_cuda_with_nvcc(_cuda_source(tc.compile_module(func, target).mod), Target(H100), "sm_90a")
            assert cubin[:4] == b"\x7fELF"
            cubin_done = True
        if seen >= want:
            break
    assert seen >= want, f"the space never sampled {sorted(want - seen)}"
