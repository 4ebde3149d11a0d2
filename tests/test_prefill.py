"""paged_prefill against the float64 reference: full and chunked prefill, ragged batches, fragmented tables, NaN in
every slot no sequence uses, causal and not, every head_dim / page size / group size / dtype."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tvm_paged as tp
from tvm_paged import reference
from paged_data import (AMX_BF16_ATOL, ATOL, DEVICE, LSE_ATOL, assert_close, cpu_only, make_pool, prefill_atol,
                        random_q)

# (dtype, num_qo_heads, num_kv_heads, head_dim, page_size): every head_dim, page size (1/5/16/32), group size
# (1, 4, 6, 8 = MQA) and dtype appears; one compile each, reused by every test below.
CONFIGS = [
    ("float32", 4, 4, 64, 16),
    ("float32", 32, 8, 128, 16),
    ("float32", 6, 1, 80, 5),
    ("float16", 12, 2, 96, 1),
    ("bfloat16", 8, 1, 256, 32),
    ("float16", 32, 8, 128, 16),
    ("bfloat16", 4, 4, 64, 5),
]
SMALL = CONFIGS[0]


def _cu(q_lens):
    return torch.tensor(np.concatenate([[0], np.cumsum(q_lens)]), dtype=torch.int32, device=DEVICE)


def _case(cfg, kv_lens, q_lens, seed=0, q_scale=1.0):
    """A fragmented NaN-filled pool for ``kv_lens`` and the queries of the last ``q_lens`` tokens of each."""
    dtype, hq, hkv, d, p = cfg
    assert all(0 <= n <= k for n, k in zip(q_lens, kv_lens))
    k, v, bt, sl = make_pool(kv_lens, page_size=p, num_kv_heads=hkv, head_dim=d, dtype=dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    q = (torch.randn(int(sum(q_lens)), hq, d, generator=gen, dtype=torch.float64) * q_scale).to(k.dtype).to(DEVICE)
    return q, k, v, bt, sl, _cu(q_lens)


def _check(cfg, kv_lens, q_lens, *, causal=True, seed=0, scale=None, q_scale=1.0):
    dtype = cfg[0]
    q, k, v, bt, sl, cu = _case(cfg, kv_lens, q_lens, seed=seed, q_scale=q_scale)
    out, lse = tp.paged_prefill(q, k, v, bt, sl, cu, causal=causal, scale=scale, return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:2] and lse.dtype == torch.float32
    ref_out, ref_lse = reference.prefill(q, k, v, bt, sl, cu, causal=causal, scale=scale)
    atol = prefill_atol(dtype, cfg[3]) * max(1.0, q_scale)
    assert_close(out, ref_out, atol)
    assert_close(lse, ref_lse, LSE_ATOL[dtype] * max(1.0, q_scale), "lse")
    return out, lse


def test_q_tile_matches_planner():
    from tvm_paged.spec import PREFILL

    tile = PREFILL.constants["q_tile"]
    plan = tp.plan_prefill(torch.zeros(2, 8, dtype=torch.int32), torch.tensor([100, 40], dtype=torch.int32),
                           _cu([100, 33]), 133, page_size=16, num_pages=8)
    tiles = plan.tiles.numpy()
    assert (tiles[:, 2] - tiles[:, 1]).max() == tile  # the 100-row sequence gets full tiles of q_tile rows


# (kv_lens, q_lens) on the small config (page size 16): full prefill, chunked prefill, exact-page and page+1
# lengths, q_len 0 inside a batch, batch 1 / 3 / 17.
SHAPES = {
    "one_token": ([1], [1]),
    "full_54": ([54], [54]),
    "chunk_97x7": ([97], [7]),
    "full_512": ([512], [512]),
    "chunk_512x33": ([512], [33]),
    "page_edges": ([16, 17, 32, 33], [16, 17, 1, 16]),
    "mixed_3": ([54, 97, 20], [17, 0, 20]),
    "batch_17": (
        [1, 54, 97, 16, 17, 33, 5, 64, 65, 100, 2, 31, 48, 49, 128, 7, 90],
        [1, 54, 16, 16, 0, 17, 5, 1, 33, 7, 2, 31, 0, 49, 16, 3, 90],
    ),
}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_prefill_shapes(shape, causal):
    kv_lens, q_lens = SHAPES[shape]
    _check(SMALL, kv_lens, q_lens, causal=causal, seed=len(kv_lens) + sum(q_lens))


def _config_lengths(p):
    """A batch of 5 around this page size's edges: full, chunked (1, 7, 17, 33 rows) and a q_len 0 sequence."""
    kv = [p, p + 1, 54, 97, 4 * p + 1]
    q = [p, 1, 0, 33, min(17, 4 * p + 1)]
    return kv, q


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "_".join(map(str, c)))
def test_prefill_configs(cfg, causal):
    kv, q = _config_lengths(cfg[4])
    _check(cfg, kv, q, causal=causal, seed=cfg[3] + cfg[4])


@pytest.mark.parametrize("cfg", [CONFIGS[1], CONFIGS[5]], ids=["f32", "f16"])
def test_prefill_long_batch(cfg):
    """Realistic heads (32/8, d128): a 512-token full prefill next to chunked ones; peaked softmax (q x 3)."""
    _check(cfg, [512, 97, 300], [512, 7, 17], seed=21, q_scale=3.0)


def test_prefill_custom_scale_and_plan_reuse():
    """One plan, several 'layers' (different q and caches), explicit scale, causal and not."""
    cfg = CONFIGS[2]
    dtype, hq, hkv, d, p = cfg
    kv, ql = [40, 13, 77], [40, 5, 16]
    plan = None
    for layer, (scale, causal) in enumerate([(0.05, True), (0.3, False), (0.3, True)]):
        q, k, v, bt, sl, cu = _case(cfg, kv, ql, seed=30)  # same table for every layer
        q = random_q(q.shape[0], hq, d, dtype, seed=40 + layer)
        if plan is None:
            plan = tp.plan_prefill(bt, sl, cu, q.shape[0], page_size=p, num_pages=k.shape[0])
        out, lse = tp.run_prefill(plan, q, k, v, scale=scale, causal=causal, return_lse=True)
        ref_out, ref_lse = reference.prefill(q, k, v, bt, sl, cu, scale=scale, causal=causal)
        assert_close(out, ref_out, ATOL[dtype])
        assert_close(lse, ref_lse, LSE_ATOL[dtype], "lse")


@pytest.mark.parametrize("cfg", [CONFIGS[2], CONFIGS[6]], ids=["f32", "bf16"])
def test_prefill_tile_reads_stop_at_its_last_position(cfg):
    """Causal: a tile reads no key past its last query's position. Keys from position 16 on are NaN, so only the
    first tile (rows 0-15) can be finite, and it must be exact; page size 5 puts position 16 inside a page (bf16:
    on an AMX host the tile path, whose products would carry a NaN into every row of a tile)."""
    dtype, hq, hkv, d, p = cfg
    n = 40
    q, k, v, bt, sl, cu = _case(cfg, [n], [n], seed=50)
    ref_out, ref_lse = reference.prefill(q, k, v, bt, sl, cu, causal=True)
    from tvm_paged.spec import PREFILL

    tile = PREFILL.constants["q_tile"]
    for pos in range(tile, n):
        page, slot = int(bt[0, pos // p]), pos % p
        k[page, slot] = float("nan")
        v[page, slot] = float("nan")
    out, lse = tp.paged_prefill(q, k, v, bt, sl, cu, causal=True, return_lse=True)
    assert_close(out[:tile], ref_out[:tile], prefill_atol(dtype, d))
    assert_close(lse[:tile], ref_lse[:tile], LSE_ATOL[dtype], "lse")


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[5], CONFIGS[6]], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_prefill_extreme_logits(cfg, causal):
    """Logits around -5e5 (q opposite to every key): a finite 'minus infinity' start (say -1e4 or -5e4) returns
    zeros or NaN. One key 8000 above the others must return that key's V exactly; equal logits the mean of V."""
    dtype, hq, hkv, d, p = cfg
    kv, ql = [37, 20], [37, 5]
    q, k, v, bt, sl, cu = _case(cfg, kv, ql, seed=60)
    q.zero_()
    q[..., 0] = -2000.0
    rng = np.random.default_rng(61)
    keys = {}  # (b, position) -> a, logit = -2000 * (256 + 4a) = -512000 - 8000a with scale 1
    for b, n in enumerate(kv):
        a = rng.permutation(n)
        for pos in range(n):
            page, slot = int(bt[b, pos // p]), pos % p
            k[page, slot] = 0.0
            k[page, slot, :, 0] = 256.0 + 4.0 * float(a[pos])
            keys[b, pos] = int(a[pos])
    out, lse = tp.paged_prefill(q, k, v, bt, sl, cu, scale=1.0, causal=causal, return_lse=True)
    ref_out, ref_lse = reference.prefill(q, k, v, bt, sl, cu, scale=1.0, causal=causal)
    assert ref_lse.max() < -5e5
    assert_close(out, ref_out, prefill_atol(dtype, d))
    assert_close(lse, ref_lse, 1e-6 * 6e5, "lse")
    out = out.double()
    for b, n in enumerate(kv):
        for i in range(ql[b]):
            row = int(cu[b]) + i
            last = n - ql[b] + i if causal else n - 1
            best = min(range(last + 1), key=lambda pos: keys[b, pos])
            page, slot = int(bt[b, best // p]), best % p
            for h in range(hq):
                expect = v[page, slot, h // (hq // hkv)].double()
                assert torch.equal(out[row, h], expect), (b, i, h)
    # Equal logits: every key the same -> the mean of the visible V rows.
    for b, n in enumerate(kv):
        for pos in range(n):
            page, slot = int(bt[b, pos // p]), pos % p
            k[page, slot, :, 0] = 256.0
    out = tp.paged_prefill(q, k, v, bt, sl, cu, scale=1.0, causal=causal)
    ref_out, _ = reference.prefill(q, k, v, bt, sl, cu, scale=1.0, causal=causal)
    assert_close(out, ref_out, prefill_atol(dtype, d))


@cpu_only
def test_prefill_numpy_and_unaligned_inputs():
    """numpy arrays in, numpy out; torch.from_numpy views offset by one element are not 64-byte aligned."""
    cfg = SMALL
    dtype, hq, hkv, d, p = cfg
    q, k, v, bt, sl, cu = _case(cfg, [54, 97, 20], [17, 7, 20], seed=70)
    ref_out, ref_lse = reference.prefill(q, k, v, bt, sl, cu)
    out, lse = tp.paged_prefill(q.numpy(), k.numpy(), v.numpy(), bt.numpy(), sl.numpy(), cu.numpy(),
                                return_lse=True)
    assert isinstance(out, np.ndarray) and isinstance(lse, np.ndarray)
    assert_close(torch.from_numpy(out), ref_out, ATOL[dtype])
    assert_close(torch.from_numpy(lse), ref_lse, LSE_ATOL[dtype], "lse")

    def unaligned(t):
        buf = np.empty(t.numel() + 1, dtype=t.numpy().dtype)[1:]
        buf[:] = t.numpy().ravel()
        arr = buf.reshape(t.shape)
        assert arr.ctypes.data % 64 != 0
        return torch.from_numpy(arr)

    out = tp.paged_prefill(unaligned(q), unaligned(k), unaligned(v), bt.long(), sl.long(), cu.long())
    assert_close(out, ref_out, ATOL[dtype])


@cpu_only
def test_prefill_f16_unaligned():
    cfg = CONFIGS[3]
    dtype = cfg[0]
    q, k, v, bt, sl, cu = _case(cfg, [9, 30], [9, 16], seed=80)
    ref_out, _ = reference.prefill(q, k, v, bt, sl, cu)
    qs = torch.cat([torch.zeros(1, dtype=q.dtype), q.flatten()])[1:].view(q.shape)  # 2-byte storage offset
    kn = np.concatenate([np.zeros(1, np.float16), k.numpy().ravel()])[1:].reshape(k.shape)
    vn = np.concatenate([np.zeros(1, np.float16), v.numpy().ravel()])[1:].reshape(v.shape)
    out = tp.paged_prefill(qs, torch.from_numpy(kn), torch.from_numpy(vn), bt, sl, cu)
    assert_close(out, ref_out, ATOL[dtype])


@cpu_only
def test_prefill_kernel_no_tiles():
    """The kernel itself with zero query rows and zero tiles writes nothing and does not fail."""
    from tvm_paged import build, targets
    from tvm_paged.config import KernelConfig

    dtype, hq, hkv, d, p = SMALL
    k, v, bt, sl = make_pool([5, 9], page_size=p, num_kv_heads=hkv, head_dim=d, seed=90)
    fn = build.get_kernel(KernelConfig("prefill", dtype, hq, hkv, d, p))
    q = torch.zeros(0, hq, d)
    out, lse = torch.empty_like(q), torch.empty(0, hq)
    k_before, v_before = k.clone(), v.clone()
    fn(q, k, v, bt, sl, _cu([0, 0]), torch.zeros(0, 3, dtype=torch.int32), out, lse, 0.125, 1)
    assert torch.equal(k.nan_to_num(7.0), k_before.nan_to_num(7.0))  # the caches are inputs only
    assert torch.equal(v.nan_to_num(7.0), v_before.nan_to_num(7.0))


def test_prefill_no_queries():
    """Every sequence with q_len 0: empty output."""
    dtype, hq, hkv, d, p = SMALL
    k, v, bt, sl = make_pool([5, 9], page_size=p, num_kv_heads=hkv, head_dim=d, seed=90)
    q = torch.zeros(0, hq, d, device=DEVICE)
    out, lse = tp.paged_prefill(q, k, v, bt, sl, _cu([0, 0]), return_lse=True)
    assert out.shape == (0, hq, d) and lse.shape == (0, hq)


@pytest.mark.parametrize(
    "cu,rows,match",
    [
        ([0, 5, 3, 8], 8, "monotone"),  # non-monotone
        ([0, 2, 4, 6], 8, "last entry"),  # does not match q's rows
        ([0, 2, 4, 20], 20, "queries but seq_lens"),  # q_len 16 > seq_len 10
        ([1, 2, 4, 6], 5, "start at 0"),
        ([0, 2, 4], 4, "batch \\+ 1"),
    ],
    ids=["non_monotone", "rows_mismatch", "q_len_gt_seq_len", "nonzero_start", "wrong_length"],
)
def test_prefill_bad_cu_seqlens(cu, rows, match):
    dtype, hq, hkv, d, p = SMALL
    k, v, bt, sl = make_pool([10, 10, 10], page_size=p, num_kv_heads=hkv, head_dim=d, seed=95)
    q = torch.zeros(rows, hq, d, device=DEVICE)
    with pytest.raises(ValueError, match="cu_seqlens_q") as exc:
        tp.paged_prefill(q, k, v, bt, sl, torch.tensor(cu, dtype=torch.int32))
    assert exc.match(match)


@cpu_only
@pytest.mark.parametrize(
    "cfg,knobs",
    [
        (("float32", 6, 1, 80, 5), {"lanes": 16}),  # the AVX-512 defaults (run as 2 x 8 lanes on AVX2)
        (("float16", 8, 2, 64, 16), {"lanes": 4, "chunk": 64, "rows_blk": 3, "pv_rows": 2, "pv_vecs": 4,
                                     "use_prefetch": False}),  # odd register blocks: rows padded to 6
        # head_dim 36: 6 lanes, not a power of two (K transposed element by element), chunk 36
        (("float16", 4, 2, 36, 5), {}),
    ],
    ids=["lanes16", "odd_blocks", "head_dim36"],
)
def test_prefill_builder_knobs(cfg, knobs):
    """Non-default builder knobs (what tuning or another CPU would pick) give the same results."""
    from tvm_paged import build, targets, tvm_compat
    from tvm_paged.config import KernelConfig
    from tvm_paged.kernels.prefill_cpu import build_prefill_cpu

    dtype, hq, hkv, d, p = cfg
    kcfg = KernelConfig("prefill", dtype, hq, hkv, d, p)
    target = targets.local_target()
    with target:
        fn = tvm_compat.compile_module(build_prefill_cpu(kcfg, **knobs), target).mod[kcfg.name]
    kv, ql = [54, 97, 17, 1], [54, 7, 0, 1]
    q, k, v, bt, sl, cu = _case(cfg, kv, ql, seed=100)
    plan = tp.plan_prefill(bt, sl, cu, q.shape[0], page_size=p, num_pages=k.shape[0])
    for causal in (True, False):
        out, lse = torch.empty_like(q), torch.empty(q.shape[:2])
        fn(q, k, v, plan.block_table, plan.seq_lens, plan.cu_seqlens_q, plan.tiles, out, lse, d ** -0.5, int(causal))
        ref_out, ref_lse = reference.prefill(q, k, v, bt, sl, cu, causal=causal)
        assert_close(out, ref_out, ATOL[dtype])
        assert_close(lse, ref_lse, LSE_ATOL[dtype], "lse")


@cpu_only
def test_every_prefill_knob_value_is_correct():
    """Correctness never depends on tuning: each value of each CPU prefill knob, causal and not, against the
    float64 reference on a NaN-filled pool (odd lengths, chunked queries, page size 5)."""
    from tvm_paged import build, targets
    from tvm_paged.kernels import knob_space

    cfg = tp.KernelConfig("prefill", "float32", 8, 2, 64, 5)
    target = targets.local_target()
    space = knob_space(cfg, target)
    assert set(space) == {"chunk", "rows_blk", "pv_rows", "pv_vecs", "use_prefetch"}
    q, k, v, bt, sl, cu = _case(("float32", 8, 2, 64, 5), [97, 17, 40], [33, 17, 1], seed=31)
    plan = tp.plan_prefill(bt, sl, cu, q.shape[0], page_size=5, num_pages=k.shape[0])
    refs = {c: reference.prefill(q, k, v, bt, sl, cu, causal=c) for c in (True, False)}
    for knob, values in space.items():
        for value in values[1:]:
            fn = build.compile_kernel(cfg, target, knobs={knob: value}).mod[cfg.name]
            for causal, (ref, ref_lse) in refs.items():
                out = torch.empty_like(q)
                lse = torch.empty(q.shape[0], 8)
                fn(q, k, v, plan.block_table, plan.seq_lens, plan.cu_seqlens_q, plan.tiles, out, lse, 64 ** -0.5,
                   int(causal))
                assert_close(out, ref, ATOL["float32"], f"{knob}={value} causal={causal}")
                assert_close(lse, ref_lse, LSE_ATOL["float32"], f"lse {knob}={value} causal={causal}")


def _has_amx() -> bool:
    from tvm_paged import targets

    return DEVICE.type == "cpu" and targets.cpu_has_feature("amx-bf16", targets.local_target())


@pytest.mark.skipif(not _has_amx(), reason="the host has no AMX-BF16")
def test_prefill_amx_knobs_and_fma_path_are_correct():
    """On an AMX host bfloat16 prefill runs on tiles by default (the grid above); here every other value of its
    knobs, and the FMA path it replaces (``amx=False``), against the float64 reference on a NaN-filled pool (odd
    lengths, chunked queries, page size 5, a tile of 16 rows padded from 17 x 4 heads)."""
    from tvm_paged import build, targets
    from tvm_paged.kernels import knob_space

    cfg = tp.KernelConfig("prefill", "bfloat16", 8, 2, 64, 5)
    target = targets.local_target()
    space = knob_space(cfg, target)
    assert set(space) == {"chunk", "use_prefetch"}
    q, k, v, bt, sl, cu = _case(("bfloat16", 8, 2, 64, 5), [97, 17, 40, 130], [33, 17, 1, 130], seed=32)
    plan = tp.plan_prefill(bt, sl, cu, q.shape[0], page_size=5, num_pages=k.shape[0])
    refs = {c: reference.prefill(q, k, v, bt, sl, cu, causal=c) for c in (True, False)}
    variants = [{knob: value} for knob, values in space.items() for value in values[1:]] + [{"amx": False}]
    for knobs in variants:
        fn = build.compile_kernel(cfg, target, knobs=knobs).mod[cfg.name]
        for causal, (ref, ref_lse) in refs.items():
            out, lse = torch.empty_like(q), torch.empty(q.shape[0], 8)
            fn(q, k, v, plan.block_table, plan.seq_lens, plan.cu_seqlens_q, plan.tiles, out, lse, 64 ** -0.5,
               int(causal))
            atol = ATOL["bfloat16"] if knobs.get("amx") is False else AMX_BF16_ATOL
            assert_close(out, ref, atol, f"{knobs} causal={causal}")
            assert_close(lse, ref_lse, LSE_ATOL["bfloat16"], f"lse {knobs} causal={causal}")


def test_prefill_amx_compiles_to_tile_instructions():
    """The AMX path is tile code (checked on any x86 host: compiled for an AMX CPU, not run), and refuses the
    configurations it cannot run, naming the knob."""
    from tvm_paged import tvm_compat as tc
    from tvm_paged.kernels.prefill_cpu import build_prefill_cpu

    target = tc.Target({"kind": "llvm", "mcpu": "sapphirerapids", "mattr": ["-prefer-256-bit"]})
    cfg = tp.KernelConfig("prefill", "bfloat16", 8, 2, 128, 16)
    asm = tc.compile_module(build_prefill_cpu(cfg, lanes=16, amx=True), target).mod.inspect_source("asm")
    for instr in ("ldtilecfg", "tileloadd", "tdpbf16ps", "tilestored", "tilerelease"):
        assert instr in asm, instr
    with pytest.raises(ValueError, match="amx"):
        build_prefill_cpu(tp.KernelConfig("prefill", "float16", 8, 2, 128, 16), lanes=16, amx=True)
    with pytest.raises(ValueError, match="chunk=96"):
        build_prefill_cpu(cfg, lanes=16, amx=True, chunk=96)


@cpu_only
@pytest.mark.parametrize("lanes", [2, 4, 8, 16])
def test_transpose_vectors_transposes(lanes):
    """The register transpose prefill's K gather uses: a lanes x lanes block of distinct values comes out as
    its transpose (16 lanes runs as two halves per vector on AVX2)."""
    from tvm_paged import targets, tvm_compat
    from tvm_paged.kernels.common import transpose_vectors
    from tvm_paged.tvm_compat import T

    n = lanes * lanes

    def block(a):
        return T.Shuffle(transpose_vectors([a[T.ramp(i * lanes, 1, lanes)] for i in range(lanes)], lanes),
                         list(range(n)))

    @T.prim_func
    def transpose(a: T.Buffer((n,), "float32"), b: T.Buffer((n,), "float32")):
        T.func_attr({"global_symbol": "transpose", "tir.noalias": True})
        b[T.ramp(0, 1, n)] = block(a)

    target = targets.local_target()
    with target:
        fn = tvm_compat.compile_module(transpose, target).mod["transpose"]
    a = torch.randn(n)
    b = torch.full((n,), float("nan"))
    fn(a, b)
    assert torch.equal(b.view(lanes, lanes), a.view(lanes, lanes).T)


def test_transpose_vectors_needs_a_power_of_two():
    from tvm_paged.kernels.common import transpose_vectors

    with pytest.raises(ValueError, match="power-of-two"):
        transpose_vectors([None] * 6, 6)
