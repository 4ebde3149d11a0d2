"""Attention variants (sliding window, logits soft-cap, ALiBi, attention sinks, fp8 KV caches) against the float64
reference, in the spirit of vLLM's test_cpu_attn.py grids: random data (never zeros), NaN in every slot no
sequence uses, fragmented page tables, batch 17 with odd and page-edge lengths, chunked and non-causal prefill.

Every distinct (kernel, dtype, kv dtype, heads, head_dim, page size, variant flags) compiles a kernel, so the
grid is a covering set of configurations, each run with every value of its options (window 0 / 1 / 255 / larger
than the context, cap 30 / 50, standard ALiBi slopes, sinks in the logits' range and a dominating one, per-tensor
and per-head fp8 scales): values are run-time arguments and cost no compile. The tolerance is ``paged_data``'s
(float32 arithmetic's error plus half an ulp of the output dtype; AMX prefill's own where a host runs it), never
loosened; fp8 caches are compared with float64 attention over the dequantized cache.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import tvm_paged as tp
from tvm_paged import reference
from paged_data import (ATOL, DEVICE, DTYPES, FP8_DTYPES, LSE_ATOL, alibi_slopes, assert_close, dense_table,
                        half_ulp, make_pool, make_variant_pool, prefill_atol, random_q)

E4M3, E5M2 = "float8_e4m3fn", "float8_e5m2"
FP8_MAX = {E4M3: 448.0, E5M2: 57344.0}
BIG_WINDOW = 100_000  # larger than every context below


@dataclass(frozen=True)
class Cfg:
    dtype: str
    kv: str | None  # None: the caches are in q's dtype
    hq: int
    hkv: int
    d: int
    p: int
    window: bool = False
    cap: bool = False
    alibi: bool = False
    sinks: bool = False

    @property
    def id(self) -> str:
        kv = {None: "", E4M3: "e4m3_", E5M2: "e5m2_"}[self.kv]
        flags = "".join(f"_{t}" for f, t in (("window", "w"), ("cap", "cap"), ("alibi", "alibi"), ("sinks", "sink"))
                        if getattr(self, f))
        return f"{kv}{self.dtype}_h{self.hq}x{self.hkv}_d{self.d}_p{self.p}{flags}"


# The covering sets: every head layout ((9, 3), (32, 8), MQA (8, 1)), head_dim (64, 128), page size (1, 5, 16), q
# dtype, fp8 format x q dtype (decode) and variant appears, alone and combined (window + cap, window + sinks,
# fp8 + window, all four; all four with fp8). One compile each.
DECODE = [
    Cfg("float32", None, 9, 3, 64, 5, window=True),
    Cfg("float16", None, 32, 8, 128, 16, window=True),
    Cfg("bfloat16", None, 8, 1, 64, 1, window=True),
    Cfg("float32", None, 32, 8, 128, 1, cap=True),
    Cfg("float16", None, 9, 3, 64, 16, cap=True),
    Cfg("float32", None, 8, 1, 128, 5, alibi=True),  # slopes of a power of two
    Cfg("bfloat16", None, 9, 3, 128, 16, alibi=True),  # interpolated slopes
    Cfg("float32", None, 9, 3, 64, 16, sinks=True),
    Cfg("bfloat16", None, 8, 1, 128, 5, sinks=True),
    Cfg("float32", E4M3, 32, 8, 128, 16),
    Cfg("float16", E5M2, 9, 3, 64, 5),
    Cfg("bfloat16", E4M3, 8, 1, 64, 1),
    Cfg("float32", None, 9, 3, 64, 5, window=True, cap=True),
    Cfg("float16", None, 32, 8, 128, 16, window=True, sinks=True),
    Cfg("float16", E4M3, 8, 1, 128, 16, window=True),
    Cfg("float32", E5M2, 9, 3, 128, 5, window=True),
    Cfg("float32", None, 9, 3, 128, 5, window=True, cap=True, alibi=True, sinks=True),
    Cfg("bfloat16", E5M2, 32, 8, 64, 16, window=True, cap=True, alibi=True, sinks=True),
]
PREFILL = [
    Cfg("float32", None, 9, 3, 64, 16, window=True),
    Cfg("bfloat16", None, 8, 1, 128, 5, window=True),
    Cfg("float16", None, 32, 8, 128, 1, cap=True),
    Cfg("float32", None, 8, 1, 64, 5, alibi=True),
    Cfg("float16", None, 9, 3, 128, 16, alibi=True),
    Cfg("bfloat16", None, 32, 8, 64, 16, sinks=True),
    Cfg("float32", E5M2, 9, 3, 64, 5),
    Cfg("bfloat16", E4M3, 32, 8, 128, 16),
    Cfg("float16", None, 9, 3, 64, 5, window=True, cap=True),
    Cfg("float32", None, 32, 8, 128, 16, window=True, sinks=True),
    Cfg("float16", E5M2, 8, 1, 64, 1, window=True),
    Cfg("float32", E4M3, 9, 3, 128, 5, window=True),
    Cfg("float32", None, 9, 3, 64, 5, window=True, cap=True, alibi=True, sinks=True),
]
# "No window" on a window configuration's shape is the plain kernel of that shape.
DECODE_PLAIN = Cfg("float32", None, 9, 3, 64, 5)
PREFILL_PLAIN = Cfg("float32", None, 9, 3, 64, 16)


# ===================================================================================== option values
def _fp8_scales(kv: str, kind: str, hkv: int):
    """(k_scale, v_scale): per-tensor floats, per-head float32 tensors, or one of each. Chosen so that unit data
    uses most of the format's range without clipping."""
    def heads(lo, hi):
        return torch.linspace(lo, hi, hkv, dtype=torch.float32).to(DEVICE)

    if kv == E4M3:
        tensor, head = (0.0123, 0.0101), (heads(0.0081, 0.03), heads(0.011, 0.025))
    else:
        tensor, head = (0.37, 0.29), (heads(0.11, 3.1), heads(0.23, 1.7))
    return {"tensor": tensor, "head": head, "mixed": (tensor[0], head[1])}[kind]


def _sinks(kind: str, hq: int, logit_range: float, seed: int) -> torch.Tensor:
    """``range``: uniform over the logits' range; ``dominant``: every third head 40 (the others in range), far
    above logits of about +-3 (or the cap)."""
    rng = np.random.default_rng(seed)
    s = rng.uniform(-logit_range, logit_range, size=hq)
    if kind == "dominant":
        s[::3] = 40.0
    return torch.tensor(s, dtype=torch.float32, device=DEVICE)


@dataclass(frozen=True)
class Run:
    """One set of option values for a configuration."""

    window: int | None = None
    freed: bool = False  # table entries of pages wholly behind the window set to -1
    cap: float | None = None
    alibi: bool = False
    sinks: str | None = None
    scales: str | None = None
    causal: bool = True

    @property
    def id(self) -> str:
        parts = []
        if self.window is not None:
            parts.append(f"w{'big' if self.window == BIG_WINDOW else self.window}{'freed' if self.freed else ''}")
        if self.cap is not None:
            parts.append(f"cap{self.cap:g}")
        if self.alibi:
            parts.append("alibi")
        if self.sinks:
            parts.append(f"sink_{self.sinks}")
        if self.scales:
            parts.append(f"scale_{self.scales}")
        if not self.causal:
            parts.append("noncausal")
        return "-".join(parts) or "plain"


def _runs(cfg: Cfg, prefill: bool) -> list[Run]:
    """Every value of every option of ``cfg``, cycled together (each value appears at least once); prefill adds
    non-causal runs (with the window, when there is one)."""
    windows = [(0, False), (1, False), (255, False), (255, True), (BIG_WINDOW, False)]
    windows = windows if cfg.window else [(None, False)]
    caps = [30.0, 50.0] if cfg.cap else [None]
    sinks = ["range", "dominant"] if cfg.sinks else [None]
    scales = ["tensor", "head", "mixed"] if cfg.kv else [None]
    n = max(len(windows), len(caps), len(sinks), len(scales))
    runs = [Run(window=windows[i % len(windows)][0], freed=windows[i % len(windows)][1], cap=caps[i % len(caps)],
                alibi=cfg.alibi, sinks=sinks[i % len(sinks)], scales=scales[i % len(scales)]) for i in range(n)]
    if prefill:
        runs += [Run(**{**r.__dict__, "causal": False}) for r in runs if not r.freed][: max(2, len(windows) - 1)]
    return runs


def _params(configs, prefill):
    return [pytest.param(c, r, id=f"{c.id}-{r.id}") for c in configs for r in _runs(c, prefill)]


# ===================================================================================== building a case
def _pool(cfg: Cfg, lens, run: Run, seed: int):
    """The caches (and options' fp8 scales) for ``lens``: ``(k, v, bt, sl, scale_options)``."""
    if cfg.kv is None:
        k, v, bt, sl = make_variant_pool(lens, page_size=cfg.p, num_kv_heads=cfg.hkv, head_dim=cfg.d,
                                         dtype=cfg.dtype, seed=seed)
        return k, v, bt, sl, {}
    ks, vs = _fp8_scales(cfg.kv, run.scales, cfg.hkv)
    k, v, bt, sl = make_variant_pool(lens, page_size=cfg.p, num_kv_heads=cfg.hkv, head_dim=cfg.d,
                                     kv_dtype=cfg.kv, k_scale=ks, v_scale=vs, seed=seed)
    assert k.dtype == FP8_DTYPES[cfg.kv]
    return k, v, bt, sl, {"k_scale": ks, "v_scale": vs}


def _options(cfg: Cfg, run: Run, logit_range: float, seed: int) -> dict:
    opts = {}
    if run.window is not None:
        opts["window_left"] = run.window
    if run.cap is not None:
        opts["logits_soft_cap"] = run.cap
    if run.alibi:
        opts["alibi_slopes"] = alibi_slopes(cfg.hq)
    if run.sinks:
        opts["sinks"] = _sinks(run.sinks, cfg.hq, logit_range, seed)
    return opts


def _free_behind_window(bt, sl, q_lens, window_left, page_size):
    """The table with entries of pages wholly before each sequence's first visible key set to -1 (a sliding
    window's freed pages), and how many were freed."""
    bt = bt.clone()
    freed = 0
    for b, (n, ql) in enumerate(zip(sl.tolist(), q_lens)):
        first = max(n - ql - window_left, 0)
        for page in range(first // page_size):
            bt[b, page] = -1
            freed += 1
    return bt, freed


def _check_lse(lse, ref_lse, dtype, rel=0.0):
    assert_close(lse, ref_lse, LSE_ATOL[dtype] + rel * float(ref_lse.abs().max()), "lse")


def _assert_option_matters(ref_fn, opts, cfg, run, atol):
    """The options really change the answer here: removing the cap, the slopes or the sinks moves the reference
    output by far more than the tolerance (``atol`` and the output dtype's rounding; a test whose option changes
    nothing proves nothing). ``ref_fn(opts)``: the reference output over a few long sequences of the batch."""
    if run.window is not None and run.window < 255:
        return  # one or two visible keys: the other options may rightly change little
    names = [n for n in ("logits_soft_cap", "alibi_slopes") if n in opts] + (["sinks"] if run.sinks == "dominant"
                                                                             else [])
    if not names:
        return
    base = ref_fn(opts)
    tolerance = atol + float(half_ulp(base, DTYPES[cfg.dtype]).max())
    for name in names:
        other = ref_fn({n: x for n, x in opts.items() if n != name})
        assert (other - base).abs().max() > 5 * tolerance, f"{name} does not matter in this case"


def _probe_rows(lens):
    """The sequences the option check looks at: 54 and 300 tokens, and the longest."""
    return [lens.index(54), lens.index(300), int(np.argmax(lens))]


# ===================================================================================== decode
def _decode_lengths(p):
    """Batch 17: 1, exact-page and page+1 edges, odd lengths (97, 255-257 around the 255 window), up to 2051."""
    return [1, 2, p, p + 1, 4 * p, 4 * p + 1, 54, 97, 255, 256, 257, 300, 511, 777, 1025, 2051, 97]


@pytest.mark.parametrize("cfg,run", _params(DECODE, prefill=False))
def test_decode_variants(cfg, run):
    seed = zlib.crc32(f"{cfg.id}-{run.id}".encode()) % 1000
    lens = _decode_lengths(cfg.p)
    k, v, bt, sl, scales = _pool(cfg, lens, run, seed)
    q_scale = 8.0 if cfg.cap else 1.0  # logits of about +-25: the cap matters
    q = (random_q(len(lens), cfg.hq, cfg.d, cfg.dtype, seed=seed + 1) * q_scale).to(DTYPES[cfg.dtype])
    opts = {**_options(cfg, run, 3.0 * q_scale, seed), **scales}
    if run.freed:
        bt, freed = _free_behind_window(bt, sl, [1] * len(lens), run.window, cfg.p)
        assert freed > 0
    out, lse = tp.paged_decode(q, k, v, bt, sl, return_lse=True, **opts)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (len(lens), cfg.hq) and lse.dtype == torch.float32
    ref_out, ref_lse = reference.decode(q, k, v, bt, sl, **opts)
    assert_close(out, ref_out, ATOL[cfg.dtype])
    _check_lse(lse, ref_lse, cfg.dtype)
    if run.window == 0 and not run.sinks and cfg.kv is None:  # one visible key, weight exactly 1: V itself
        assert torch.equal(out.double().cpu(), ref_out.to(out.dtype).double()), "window 0: not exactly V"
    idx = _probe_rows(lens)
    _assert_option_matters(lambda o: reference.decode(q[idx], k, v, bt[idx], sl[idx], **o)[0], opts, cfg, run,
                           ATOL[cfg.dtype])


@pytest.mark.parametrize("cfg,run", _params(DECODE, prefill=False))
def test_decode_variants_split(cfg, run):
    """One long sequence alone, or two: the default plan splits the KV range over the cores and merges the parts by
    their LSE (the sinks enter at the merge), each option applied per part."""
    seed = zlib.crc32(f"split-{cfg.id}-{run.id}".encode()) % 1000
    for lens in ([3001], [2053, 1500]):
        k, v, bt, sl, scales = _pool(cfg, lens, run, seed)
        q_scale = 8.0 if cfg.cap else 1.0
        q = (random_q(len(lens), cfg.hq, cfg.d, cfg.dtype, seed=seed + 1) * q_scale).to(DTYPES[cfg.dtype])
        opts = {**_options(cfg, run, 3.0 * q_scale, seed), **scales}
        if run.freed:
            bt, _ = _free_behind_window(bt, sl, [1] * len(lens), run.window, cfg.p)
        plan = tp.plan_decode(bt, sl, page_size=cfg.p, num_pages=k.shape[0], window_left=opts.get("window_left", -1))
        if tp.plan._num_threads() > 1 and DEVICE.type == "cpu" and opts.get("window_left", BIG_WINDOW) >= 1024:
            assert plan.num_splits > 1
        out, lse = tp.run_decode(plan, q, k, v, return_lse=True, **{n: x for n, x in opts.items()
                                                                     if n != "window_left"})
        ref_out, ref_lse = reference.decode(q, k, v, bt, sl, **opts)
        assert_close(out, ref_out, ATOL[cfg.dtype], f"{lens}: out")
        _check_lse(lse, ref_lse, cfg.dtype)


@pytest.mark.parametrize("window", [-1, 0, 1, 255, BIG_WINDOW], ids=lambda w: f"w{w}")
def test_decode_window_none_and_values(window):
    """window_left -1 (the plain kernel of a window configuration's shape) and every window value, against the
    reference; a window larger than the context gives the plain kernel's answer."""
    cfg = DECODE_PLAIN
    lens = _decode_lengths(cfg.p)
    k, v, bt, sl = make_variant_pool(lens, page_size=cfg.p, num_kv_heads=cfg.hkv, head_dim=cfg.d, seed=3)
    q = random_q(len(lens), cfg.hq, cfg.d, seed=4)
    out, lse = tp.paged_decode(q, k, v, bt, sl, window_left=window, return_lse=True)
    ref_out, ref_lse = reference.decode(q, k, v, bt, sl, window_left=window)
    assert_close(out, ref_out, ATOL[cfg.dtype])
    _check_lse(lse, ref_lse, cfg.dtype)
    if window == BIG_WINDOW:
        plain = tp.paged_decode(q, k, v, bt, sl)
        assert_close(plain, ref_out, ATOL[cfg.dtype])


# ===================================================================================== prefill
def _prefill_lengths(p):
    """Batch 17 (kv_lens, q_lens): full prefill, chunked prefill (q_len < seq_len) against up to 1000 cached
    tokens, q_len 0, exact-page and page+1 lengths, 255-257 around the 255 window."""
    kv = [1, p, p + 1, 4 * p + 1, 54, 97, 97, 130, 255, 256, 257, 300, 600, 1000, 17, 2, 33]
    q = [1, p, 1, 4 * p + 1, 54, 7, 97, 130, 16, 0, 33, 17, 40, 33, 17, 2, 1]
    return kv, q


def _cu(q_lens):
    return torch.tensor(np.concatenate([[0], np.cumsum(q_lens)]), dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("cfg,run", _params(PREFILL, prefill=True))
def test_prefill_variants(cfg, run):
    seed = zlib.crc32(f"{cfg.id}-{run.id}".encode()) % 1000
    kv_lens, q_lens = _prefill_lengths(cfg.p)
    k, v, bt, sl, scales = _pool(cfg, kv_lens, run, seed)
    q_scale = 8.0 if cfg.cap else 1.0
    q = (random_q(sum(q_lens), cfg.hq, cfg.d, cfg.dtype, seed=seed + 1) * q_scale).to(DTYPES[cfg.dtype])
    cu = _cu(q_lens)
    opts = {**_options(cfg, run, 3.0 * q_scale, seed), **scales}
    if run.freed:
        bt, freed = _free_behind_window(bt, sl, q_lens, run.window, cfg.p)
        assert freed > 0
    out, lse = tp.paged_prefill(q, k, v, bt, sl, cu, causal=run.causal, return_lse=True, **opts)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:2] and lse.dtype == torch.float32
    ref_out, ref_lse = reference.prefill(q, k, v, bt, sl, cu, causal=run.causal, **opts)
    atol = prefill_atol(cfg.dtype, cfg.d, cfg.kv)
    assert_close(out, ref_out, atol)
    _check_lse(lse, ref_lse, cfg.dtype)
    if run.window == 0 and run.causal and not run.sinks and cfg.kv is None:
        assert torch.equal(out.double().cpu(), ref_out.to(out.dtype).double()), "window 0: not exactly V"
    idx = _probe_rows(kv_lens)
    rows = torch.cat([torch.arange(int(cu[b]), int(cu[b + 1])) for b in idx])
    sub_cu = _cu([q_lens[b] for b in idx])
    _assert_option_matters(lambda o: reference.prefill(q[rows], k, v, bt[idx], sl[idx], sub_cu, causal=run.causal,
                                                       **o)[0], opts, cfg, run, atol)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("window", [-1, 0, 1, 255, BIG_WINDOW], ids=lambda w: f"w{w}")
def test_prefill_window_none_and_values(window, causal):
    cfg = PREFILL_PLAIN
    kv_lens, q_lens = _prefill_lengths(cfg.p)
    k, v, bt, sl = make_variant_pool(kv_lens, page_size=cfg.p, num_kv_heads=cfg.hkv, head_dim=cfg.d, seed=5)
    q = random_q(sum(q_lens), cfg.hq, cfg.d, seed=6)
    cu = _cu(q_lens)
    out, lse = tp.paged_prefill(q, k, v, bt, sl, cu, causal=causal, window_left=window, return_lse=True)
    ref_out, ref_lse = reference.prefill(q, k, v, bt, sl, cu, causal=causal, window_left=window)
    assert_close(out, ref_out, ATOL[cfg.dtype])
    _check_lse(lse, ref_lse, cfg.dtype)
    if window == BIG_WINDOW:
        assert_close(tp.paged_prefill(q, k, v, bt, sl, cu, causal=causal), ref_out, ATOL[cfg.dtype])


# ===================================================================================== -5e5 logits
# q = -1024 e_0 and every key 512 e_0 (fp8: code 256 times k_scale 2) with scale 1: every logit is -2^19 exactly
# (test_decode's case): a finite "minus infinity" start (-1e4, -5e4) gives zeros or NaN. Each option then acts with
# a margin that float32 resolves at that magnitude (its spacing there is 1/16): ALiBi slopes 0 (all keys equal: the
# mean of the visible V) or 16..64 per position (the query's own key takes all the weight: its V), sinks 64 below
# the logits (no effect), 64 above (all the weight: out 0) or 0 (e^0 against e^-524288).
def _extreme_options(cfg: Cfg, run: Run) -> dict:
    opts = {"scale": 1.0}
    if run.window is not None:
        opts["window_left"] = run.window
    if run.cap is not None:
        opts["logits_soft_cap"] = run.cap
    if run.alibi:
        opts["alibi_slopes"] = torch.tensor([(0.0, 16.0, 32.0, 64.0)[h % 4] for h in range(cfg.hq)],
                                            dtype=torch.float32, device=DEVICE)
    if run.sinks:
        if run.sinks == "dominant":
            s = np.array([0.0 if h % 3 == 0 else -(2.0 ** 19) - 64 for h in range(cfg.hq)])
        else:
            s = -(2.0 ** 19) + np.resize(np.array([-64.0, 64.0, -1000.0]), cfg.hq)
        opts["sinks"] = torch.tensor(s, dtype=torch.float32, device=DEVICE)
    if cfg.kv is not None:
        ks, vs = _fp8_scales(cfg.kv, run.scales, cfg.hkv)
        opts["k_scale"] = 2.0 if isinstance(ks, float) else torch.full_like(ks, 2.0)
        opts["v_scale"] = vs
    return opts


def _extreme_case(cfg: Cfg, lens, run: Run, rows: int, seed: int):
    k, v, bt, sl, _ = _pool(cfg, lens, run, seed)
    kf = k.float().cpu()
    used = ~torch.isnan(kf[:, :, 0, 0])
    kf[used] = 0.0
    kf[..., 0][used] = 256.0 if cfg.kv is not None else 512.0
    k = kf.to(k.dtype).to(DEVICE)
    q = torch.zeros(rows, cfg.hq, cfg.d, dtype=DTYPES[cfg.dtype])
    q[..., 0] = -1024.0
    return q.to(DEVICE), k, v, bt, sl


def _extreme_params(configs, prefill):
    out = []
    for c in configs:
        runs = [r for r in _runs(c, prefill) if not r.freed]
        out += [pytest.param(c, r, id=f"{c.id}-{r.id}") for r in runs]
    return out


def _decode_extreme(cfg, run, lens):
    q, k, v, bt, sl = _extreme_case(cfg, lens, run, len(lens), seed=7)
    opts = _extreme_options(cfg, run)
    plan = tp.plan_decode(bt, sl, page_size=cfg.p, num_pages=k.shape[0], window_left=opts.get("window_left", -1))
    out, lse = tp.run_decode(plan, q, k, v, return_lse=True, **{n: x for n, x in opts.items() if n != "window_left"})
    ref_out, ref_lse = reference.decode(q, k, v, bt, sl, **opts)
    if not cfg.cap and run.sinks != "dominant":
        assert ref_lse.max() < -4e5
    assert_close(out, ref_out, ATOL[cfg.dtype], f"{lens}, {plan.num_splits} splits: out")
    _check_lse(lse, ref_lse, cfg.dtype, rel=3e-7)


@pytest.mark.parametrize("cfg,run", _extreme_params(DECODE, prefill=False))
def test_decode_extreme_logits(cfg, run):
    """A batch of short and odd lengths (one KV split each)."""
    _decode_extreme(cfg, run, [1, 2, cfg.p + 1, 13, 97, 300])


@pytest.mark.parametrize("cfg,run", _extreme_params([DECODE_PLAIN] + DECODE, prefill=False))
def test_decode_extreme_logits_split(cfg, run):
    """One 2051-token sequence alone: the default plan splits its keys over the cores (4 splits on 2 threads) and
    merges the parts by their LSE, here about -5.2e5 (-7.6e5 in the log2 domain, where float32's spacing is 1/16)."""
    _decode_extreme(cfg, run, [2051])


@pytest.mark.parametrize("cfg,run", _extreme_params(PREFILL, prefill=True))
def test_prefill_extreme_logits(cfg, run):
    kv_lens, q_lens = [1, cfg.p + 1, 37, 300], [1, cfg.p + 1, 5, 33]
    q, k, v, bt, sl = _extreme_case(cfg, kv_lens, run, sum(q_lens), seed=8)
    cu = _cu(q_lens)
    opts = _extreme_options(cfg, run)
    out, lse = tp.paged_prefill(q, k, v, bt, sl, cu, causal=run.causal, return_lse=True, **opts)
    ref_out, ref_lse = reference.prefill(q, k, v, bt, sl, cu, causal=run.causal, **opts)
    if not cfg.cap and run.sinks != "dominant":
        assert ref_lse.max() < -4e5
    assert_close(out, ref_out, prefill_atol(cfg.dtype, cfg.d, cfg.kv))
    _check_lse(lse, ref_lse, cfg.dtype, rel=3e-7)


# ===================================================================================== write_kv / copy_pages, fp8
WRITE_SHAPE = (3, 64, 5)  # num_kv_heads, head_dim, page_size
WRITE_CONFIGS = [(dt, kv) for kv in (E4M3, E5M2) for dt in ("float32", "float16", "bfloat16")]


def _write_scales(kind: str, hkv: int):
    if kind == "tensor":
        return 0.37, 2.9
    return (torch.tensor([0.011, 1.0, 37.0], dtype=torch.float32, device=DEVICE)[:hkv],
            torch.tensor([3.3, 0.0625, 0.7], dtype=torch.float32, device=DEVICE)[:hkv])


def _nan_cache(kv: str, shape):
    return torch.full(shape, float("nan"), dtype=torch.float32).to(FP8_DTYPES[kv]).to(DEVICE)


def _spanning_values(n, hkv, d, dtype: str, seed: int) -> torch.Tensor:
    """Signed values with magnitudes spread log-uniformly over 1e-8..1e5 (float16: over its finite normal and
    subnormal range, 6e-8..6e4), above every fp8 format's max included."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = (-7.2, 4.78) if dtype == "float16" else (-8.0, 5.0)
    mag = 10.0 ** (lo + (hi - lo) * torch.rand(n, hkv, d, generator=gen, dtype=torch.float64))
    sign = torch.where(torch.rand(n, hkv, d, generator=gen) < 0.5, -1.0, 1.0).double()
    x = (mag * sign).to(DTYPES[dtype])
    assert torch.isfinite(x).all() and (x != 0).all()
    return x


def _check_write(dtype, kv, k, v, slots, k_scale, v_scale):
    hkv, d, p = WRITE_SHAPE
    num_pages = 7
    kc, vc = _nan_cache(kv, (num_pages, p, hkv, d)), _nan_cache(kv, (num_pages, p, hkv, d))
    expect_k, expect_v = kc.view(torch.uint8).clone(), vc.view(torch.uint8).clone()
    live = slots >= 0
    expect_k.view(-1, hkv, d)[slots[live]] = reference.quantize_kv(k[live], FP8_DTYPES[kv], k_scale).view(
        torch.uint8).to(DEVICE)
    expect_v.view(-1, hkv, d)[slots[live]] = reference.quantize_kv(v[live], FP8_DTYPES[kv], v_scale).view(
        torch.uint8).to(DEVICE)
    tp.write_kv(k, v, kc, vc, slots, k_scale=k_scale, v_scale=v_scale)
    for got, expect, name in ((kc, expect_k, "k_cache"), (vc, expect_v, "v_cache")):
        bits = got.view(torch.uint8)
        if not torch.equal(bits, expect):
            diff = (bits != expect).nonzero()
            i = tuple(diff[0].tolist())
            raise AssertionError(f"{name}: {len(diff)} codes differ from reference.quantize_kv, first at {i}: "
                                 f"got {int(bits[i]):#04x} ({float(got[i].float()):g}) expected {int(expect[i]):#04x}")
        written = got.view(-1, hkv, d)[slots[live]].float()
        assert torch.isfinite(written).all(), f"{name}: inf or NaN written"
        assert written.abs().max() <= FP8_MAX[kv]


@pytest.mark.parametrize("scales", ["tensor", "head"])
@pytest.mark.parametrize("dtype,kv", WRITE_CONFIGS, ids=lambda x: str(x))
def test_write_kv_fp8_matches_quantize_kv(dtype, kv, scales):
    """Bitwise against reference.quantize_kv for values over 1e-8..1e5 (subnormals, values above the format's max:
    stored as the max finite), NaN codes left in every slot not written, -1 slots skipped."""
    hkv, d, p = WRITE_SHAPE
    n = 23
    slots = torch.randperm(7 * p, generator=torch.Generator().manual_seed(1))[:n].to(DEVICE)
    slots[[4, 17]] = -1
    k = _spanning_values(n, hkv, d, dtype, seed=2).to(DEVICE)
    v = _spanning_values(n, hkv, d, dtype, seed=3).to(DEVICE)
    k_scale, v_scale = _write_scales(scales, hkv)
    _check_write(dtype, kv, k, v, slots, k_scale, v_scale)


def _fp8_grid(kv: str) -> torch.Tensor:
    """Every finite non-negative value of the format, ascending (float32)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8_DTYPES[kv]).float()
    return torch.unique(codes[torch.isfinite(codes) & (codes >= 0)])


@pytest.mark.parametrize("scales", ["one", "pow2", "head_pow2"])
@pytest.mark.parametrize("dtype,kv", WRITE_CONFIGS, ids=lambda x: str(x))
def test_write_kv_fp8_rounding_ties_and_clamp(dtype, kv, scales):
    """Exact halfway points between neighbouring codes (round to nearest even), the codes themselves, values just
    above the max, far above it and the max itself, both signs; scales powers of two so x / scale is exact."""
    hkv, d, p = WRITE_SHAPE
    grid = _fp8_grid(kv)
    fmax = FP8_MAX[kv]
    mids = (grid[1:] + grid[:-1]) / 2
    above = torch.tensor([fmax * (1 + 2.0 ** -6), fmax * 1.5, fmax * 2, fmax * 100, 1e5])
    vals = torch.cat([mids, grid, above])
    vals = torch.cat([vals, -vals])
    k_scale, v_scale = {"one": (1.0, 1.0), "pow2": (0.25, 4.0),
                        "head_pow2": (torch.tensor([0.5, 2.0, 0.125], device=DEVICE),
                                      torch.tensor([1.0, 0.25, 8.0], device=DEVICE))}[scales]
    ks = reference._per_head(k_scale, hkv).float()
    vs = reference._per_head(v_scale, hkv).float()
    total = 7 * p
    x = vals[torch.arange(total * d) % len(vals)].reshape(total, d)
    k = x[:, None, :] * ks[None, :, None]
    v = x.flip(0)[:, None, :] * vs[None, :, None]
    k_t, v_t = k.to(DTYPES[dtype]), v.to(DTYPES[dtype])
    # Keep the rows the input dtype holds exactly (float16 cannot hold 1e5, nor every tie).
    exact = (torch.isfinite(k_t.float()) & (k_t.float() == k)).flatten(1).all(1) & \
            (torch.isfinite(v_t.float()) & (v_t.float() == v)).flatten(1).all(1)
    assert exact.sum() > total // 3
    k_t, v_t = k_t[exact].to(DEVICE), v_t[exact].to(DEVICE)
    slots = torch.randperm(total, generator=torch.Generator().manual_seed(4))[: k_t.shape[0]].to(DEVICE)
    _check_write(dtype, kv, k_t, v_t, slots, k_scale, v_scale)


@pytest.mark.parametrize("kv", [E4M3, E5M2])
def test_copy_pages_fp8(kv):
    """Whole pages of codes copied bit for bit, NaN codes included."""
    hkv, d, p = WRITE_SHAPE
    gen = torch.Generator().manual_seed(9)
    kc = torch.randint(0, 256, (13, p, hkv, d), generator=gen, dtype=torch.int32).to(torch.uint8)
    vc = torch.randint(0, 256, (13, p, hkv, d), generator=gen, dtype=torch.int32).to(torch.uint8)
    kc[0, 0, 0, :4] = 0x7F  # NaN in both formats
    kc, vc = kc.view(FP8_DTYPES[kv]).to(DEVICE), vc.view(FP8_DTYPES[kv]).to(DEVICE)
    src = torch.tensor([0, 4, 4, 9], dtype=torch.int32, device=DEVICE)
    dst = torch.tensor([12, 1, 2, 3], dtype=torch.int32, device=DEVICE)
    expect_k, expect_v = kc.view(torch.uint8).clone(), vc.view(torch.uint8).clone()
    expect_k[dst.long()] = expect_k[src.long()]
    expect_v[dst.long()] = expect_v[src.long()]
    tp.copy_pages(kc, vc, src, dst)
    assert torch.equal(kc.view(torch.uint8), expect_k) and torch.equal(vc.view(torch.uint8), expect_v)


def test_write_kv_then_decode_fp8():
    """write_kv into an fp8 pool, then decode over it with the same per-head scales: the reference over the
    written codes (end to end through the cache the kernels fill)."""
    cfg = DECODE[9]  # float32 q, e4m3, 32x8, d128, p16
    lens = [1, 17, 97]
    _, _, bt, sl = make_pool(lens, page_size=cfg.p, num_kv_heads=cfg.hkv, head_dim=cfg.d, seed=10)
    num_pages = int(bt.max()) + 1
    kc = _nan_cache(cfg.kv, (num_pages, cfg.p, cfg.hkv, cfg.d))
    vc = _nan_cache(cfg.kv, (num_pages, cfg.p, cfg.hkv, cfg.d))
    ks, vs = _fp8_scales(cfg.kv, "head", cfg.hkv)
    slots = torch.cat([bt[b, torch.arange(n, device=DEVICE) // cfg.p].long() * cfg.p
                       + torch.arange(n, device=DEVICE) % cfg.p for b, n in enumerate(lens)])
    gen = torch.Generator().manual_seed(11)
    k = torch.randn(len(slots), cfg.hkv, cfg.d, generator=gen).clamp(-3, 3).to(DEVICE)
    v = torch.randn(len(slots), cfg.hkv, cfg.d, generator=gen).clamp(-3, 3).to(DEVICE)
    tp.write_kv(k, v, kc, vc, slots, k_scale=ks, v_scale=vs)
    q = random_q(len(lens), cfg.hq, cfg.d, seed=12)
    out, lse = tp.paged_decode(q, kc, vc, bt, sl, k_scale=ks, v_scale=vs, return_lse=True)
    ref_out, ref_lse = reference.decode(q, kc, vc, bt, sl, k_scale=ks, v_scale=vs)
    assert_close(out, ref_out, ATOL[cfg.dtype])
    _check_lse(lse, ref_lse, cfg.dtype)
    # And close to attention over the unquantized values (e4m3's rounding: 2^-4 relative at most).
    dense, _ = reference.decode(q, k.view(-1, 1, cfg.hkv, cfg.d), v.view(-1, 1, cfg.hkv, cfg.d), dense_table(lens),
                                sl)
    assert (dense - ref_out).abs().max() < 0.2


# ===================================================================================== bad input
OTHER_DEVICE = torch.device("meta") if DEVICE.type == "cpu" else torch.device("cpu")


@pytest.fixture()
def plain_batch():
    cfg = DECODE_PLAIN
    k, v, bt, sl = make_variant_pool([7, 12, 3], page_size=cfg.p, num_kv_heads=cfg.hkv, head_dim=cfg.d, seed=13)
    q = random_q(3, cfg.hq, cfg.d, seed=14)
    return q, k, v, bt, sl


@pytest.fixture()
def fp8_batch():
    cfg = DECODE[10]  # float16 q, e5m2, 9x3, d64, p5
    k, v, bt, sl = make_variant_pool([7, 12, 3], page_size=cfg.p, num_kv_heads=cfg.hkv, head_dim=cfg.d,
                                     kv_dtype=cfg.kv, k_scale=0.5, v_scale=0.5, seed=15)
    q = random_q(3, cfg.hq, cfg.d, cfg.dtype, seed=16)
    return q, k, v, bt, sl


def _f32(*shape, value=0.5, device=None):
    return torch.full(shape, value, dtype=torch.float32, device=DEVICE if device is None else device)


HQ, HKV = DECODE_PLAIN.hq, DECODE_PLAIN.hkv
BAD_OPTIONS = {
    "window_m2": ("window_left", dict(window_left=-2)),
    "window_m100": ("window_left", dict(window_left=-100)),
    "window_float": ("window_left", dict(window_left=3.0)),
    "window_str": ("window_left", dict(window_left="3")),
    "window_bool": ("window_left", dict(window_left=True)),
    "window_none": ("window_left", dict(window_left=None)),
    "window_huge": ("window_left", dict(window_left=2**40)),
    "cap_negative": ("logits_soft_cap", dict(logits_soft_cap=-1.0)),
    "cap_inf": ("logits_soft_cap", dict(logits_soft_cap=float("inf"))),
    "cap_nan": ("logits_soft_cap", dict(logits_soft_cap=float("nan"))),
    "cap_str": ("logits_soft_cap", dict(logits_soft_cap="abc")),
    "cap_numeric_str": ("logits_soft_cap", dict(logits_soft_cap="30")),
    "cap_list": ("logits_soft_cap", dict(logits_soft_cap=[30.0])),
    "alibi_short": ("alibi_slopes", dict(alibi_slopes=_f32(HQ - 1))),
    "alibi_per_kv_head": ("alibi_slopes", dict(alibi_slopes=_f32(HKV))),
    "alibi_2d": ("alibi_slopes", dict(alibi_slopes=_f32(1, HQ))),
    "alibi_scalar": ("alibi_slopes", dict(alibi_slopes=torch.tensor(0.5))),
    "alibi_float64": ("alibi_slopes", dict(alibi_slopes=_f32(HQ).double())),
    "alibi_float16": ("alibi_slopes", dict(alibi_slopes=_f32(HQ).half())),
    "alibi_device": ("alibi_slopes", dict(alibi_slopes=_f32(HQ, device=OTHER_DEVICE))),
    "alibi_nan": ("alibi_slopes", dict(alibi_slopes=_f32(HQ, value=float("nan")))),
    "alibi_list": ("alibi_slopes", dict(alibi_slopes=[0.5] * HQ)),
    "sinks_long": ("sinks", dict(sinks=_f32(HQ + 1))),
    "sinks_2d": ("sinks", dict(sinks=_f32(HQ, 1))),
    "sinks_float64": ("sinks", dict(sinks=_f32(HQ).double())),
    "sinks_bfloat16": ("sinks", dict(sinks=_f32(HQ).bfloat16())),
    "sinks_int": ("sinks", dict(sinks=torch.zeros(HQ, dtype=torch.int32, device=DEVICE))),
    "sinks_device": ("sinks", dict(sinks=_f32(HQ, device=OTHER_DEVICE))),
    "sinks_nan": ("sinks", dict(sinks=_f32(HQ, value=float("nan")))),
    # Scales on caches in q's dtype (they hold values unscaled).
    "k_scale_plain": ("k_scale", dict(k_scale=0.5)),
    "v_scale_plain": ("v_scale", dict(v_scale=2.0)),
    "k_scale_tensor_plain": ("k_scale", dict(k_scale=_f32(HKV))),
    "v_scale_tensor_plain": ("v_scale", dict(v_scale=_f32(HKV, value=1.0))),
}
FP8_KV = DECODE[10].hkv
BAD_FP8_OPTIONS = {
    "k_scale_zero": ("k_scale", dict(k_scale=0.0)),
    "k_scale_numeric_str": ("k_scale", dict(k_scale="0.5")),
    "k_scale_negative": ("k_scale", dict(k_scale=-0.5)),
    "v_scale_negative": ("v_scale", dict(v_scale=-1.0)),
    "k_scale_nan": ("k_scale", dict(k_scale=float("nan"))),
    "v_scale_inf": ("v_scale", dict(v_scale=float("inf"))),
    "k_scale_str": ("k_scale", dict(k_scale="a")),
    "k_scale_head_zero": ("k_scale", dict(k_scale=torch.tensor([0.5, 0.0, 0.5], device=DEVICE))),
    "v_scale_head_negative": ("v_scale", dict(v_scale=torch.tensor([0.5, -0.5, 0.5], device=DEVICE))),
    "v_scale_head_nan": ("v_scale", dict(v_scale=torch.tensor([0.5, float("nan"), 0.5], device=DEVICE))),
    "k_scale_head_inf": ("k_scale", dict(k_scale=torch.tensor([float("inf"), 0.5, 0.5], device=DEVICE))),
    "k_scale_short": ("k_scale", dict(k_scale=_f32(FP8_KV - 1))),
    "v_scale_per_q_head": ("v_scale", dict(v_scale=_f32(9))),
    "k_scale_2d": ("k_scale", dict(k_scale=_f32(1, FP8_KV))),
    "k_scale_0d": ("k_scale", dict(k_scale=torch.tensor(0.5))),
    "v_scale_float64": ("v_scale", dict(v_scale=_f32(FP8_KV).double())),
    "k_scale_device": ("k_scale", dict(k_scale=_f32(FP8_KV, device=OTHER_DEVICE))),
}


def _raises(name, fn):
    with pytest.raises(ValueError) as exc:
        fn()
    assert str(exc.value).startswith(name), f"error does not name {name}: {exc.value}"


def _refused_without_writing(name, q, k, v, bt, sl, opts):
    """decode and prefill both refuse, naming ``name``, and leave ``out`` as it was."""
    for kernel in ("decode", "prefill"):
        sentinel = torch.full_like(q, 7.0)
        out = sentinel.clone()
        if kernel == "decode":
            _raises(name, lambda: tp.paged_decode(q, k, v, bt, sl, out=out, **opts))
        else:
            cu = _cu([1] * q.shape[0])
            _raises(name, lambda: tp.paged_prefill(q, k, v, bt, sl, cu, out=out, **opts))
        assert torch.equal(out, sentinel), f"{kernel}: out written although the call was refused"


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_options(case, plain_batch):
    name, opts = BAD_OPTIONS[case]
    _refused_without_writing(name, *plain_batch, opts)


@pytest.mark.parametrize("case", list(BAD_FP8_OPTIONS))
def test_bad_fp8_scales(case, fp8_batch):
    name, opts = BAD_FP8_OPTIONS[case]
    _refused_without_writing(name, *fp8_batch, opts)


@pytest.mark.parametrize("qdtype", [torch.float64, torch.int32, torch.float8_e4m3fn, torch.float8_e5m2],
                         ids=str)
def test_fp8_caches_refuse_unsupported_q_dtype(qdtype, fp8_batch):
    q, k, v, bt, sl = fp8_batch
    _refused_without_writing("q", q.float().to(qdtype), k, v, bt, sl, dict(k_scale=0.5, v_scale=0.5))


def _write_refused(name, k, v, kc, vc, slots, **scales):
    before = kc.view(torch.uint8).clone(), vc.view(torch.uint8).clone()
    _raises(name, lambda: tp.write_kv(k, v, kc, vc, slots, **scales))
    assert torch.equal(kc.view(torch.uint8), before[0]) and torch.equal(vc.view(torch.uint8), before[1]), \
        "write_kv wrote into the caches although it refused the call"


BAD_WRITE_SCALES = {n: c for n, c in BAD_FP8_OPTIONS.items()}


@pytest.mark.parametrize("case", list(BAD_WRITE_SCALES))
def test_write_kv_fp8_bad_scales_write_nothing(case):
    hkv, d, p = WRITE_SHAPE
    name, scales = BAD_WRITE_SCALES[case]
    kc, vc = _nan_cache(E4M3, (7, p, hkv, d)), _nan_cache(E4M3, (7, p, hkv, d))
    k = torch.randn(4, hkv, d).to(DEVICE)
    _write_refused(name, k, k.clone(), kc, vc, torch.tensor([0, 3, 9, 30], device=DEVICE), **scales)


@pytest.mark.parametrize("case", ["k_float64", "v_float64", "k_fp8", "mixed_dtypes", "k_scale_plain",
                                  "v_scale_tensor_plain"])
def test_write_kv_bad_dtypes_write_nothing(case):
    hkv, d, p = WRITE_SHAPE
    slots = torch.tensor([0, 3, 9, 30], device=DEVICE)
    k = torch.randn(4, hkv, d).to(DEVICE)
    kc, vc = _nan_cache(E5M2, (7, p, hkv, d)), _nan_cache(E5M2, (7, p, hkv, d))
    if case == "k_float64":
        _write_refused("k", k.double(), k, kc, vc, slots)
    elif case == "v_float64":
        _write_refused("v", k, k.double(), kc, vc, slots)
    elif case == "k_fp8":
        _write_refused("k", k.to(torch.float8_e5m2), k, kc, vc, slots)
    elif case == "mixed_dtypes":
        _write_refused("v", k, k.half(), kc, vc, slots)
    else:  # scales for caches in the values' dtype
        pc = torch.full((7, p, hkv, d), float("nan"), device=DEVICE)
        pv = pc.clone()
        if case == "k_scale_plain":
            _write_refused("k_scale", k, k, pc, pv, slots, k_scale=0.5)
        else:
            _write_refused("v_scale", k, k, pc, pv, slots, v_scale=torch.ones(hkv, device=DEVICE))
