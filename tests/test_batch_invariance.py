"""batch_invariant=True: a sequence's output and LSE are bitwise the same whatever else is in the batch.

One sequence (777 tokens, or 5000 tokens spanning several batch-invariant splits) alone, then inside batches of
3 and 17 with other neighbours and lengths (much longer ones included), at different batch indices and on
different physical pages holding the same data; decode and prefill (chunked: the last rows of the sequence), a
plain configuration, a variant (window + sinks) and an fp8 one. The default (batch_invariant=False) may split a
sequence differently per batch: its results stay within the tolerance of the float64 reference (whether they
differ bitwise is not asserted).

The configurations are shapes test_variants.py compiles too (one kernel each, shared through the disk cache).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tvm_paged as tp
from tvm_paged import reference
from paged_data import ATOL, DEVICE, DTYPES, FP8_DTYPES, LSE_ATOL, assert_close, pool_from_sequences

# name -> (kernel, q dtype, kv dtype or None, hq, hkv, d, page_size, window_left, sinks?, fp8 per-head scales?)
CONFIGS = {
    "decode-plain": ("decode", "float32", None, 9, 3, 64, 5, -1, False),
    "decode-window_sinks": ("decode", "float16", None, 32, 8, 128, 16, 3000, True),
    "decode-fp8": ("decode", "float32", "float8_e4m3fn", 32, 8, 128, 16, -1, False),
    "prefill-plain": ("prefill", "float32", None, 9, 3, 64, 16, -1, False),
    "prefill-window_sinks": ("prefill", "float32", None, 32, 8, 128, 16, 3000, True),
    "prefill-fp8": ("prefill", "bfloat16", "float8_e4m3fn", 32, 8, 128, 16, -1, False),
}
# The sequence under test: (kv_len, q_len for prefill).
TARGETS = {"short": (777, 40), "long": (5000, 33)}
TARGET_SEED = 1234


class Case:
    def __init__(self, name):
        (self.kernel, self.dtype, self.kv, self.hq, self.hkv, self.d, self.p, self.window,
         sinks) = CONFIGS[name]
        self.cache_dtype = FP8_DTYPES[self.kv] if self.kv else DTYPES[self.dtype]
        self.opts = {}
        if self.window >= 0:
            self.opts["window_left"] = self.window
        if sinks:
            self.opts["sinks"] = torch.linspace(-2.0, 3.0, self.hq, dtype=torch.float32).to(DEVICE)
        if self.kv:
            self.opts["k_scale"] = torch.linspace(0.008, 0.02, self.hkv, dtype=torch.float32).to(DEVICE)
            self.opts["v_scale"] = 0.0113

    def sequence(self, n: int, q_len: int, seed: int):
        """(k, v, q) of one sequence from its own seed: k, v [n, hkv, d] in the cache dtype, q [q_len or 1, hq, d]."""
        gen = torch.Generator().manual_seed(seed)
        k = torch.randn(n, self.hkv, self.d, generator=gen).clamp(-3, 3)
        v = torch.randn(n, self.hkv, self.d, generator=gen).clamp(-3, 3)
        if self.kv:
            k = reference.quantize_kv(k, self.cache_dtype, self.opts["k_scale"])
            v = reference.quantize_kv(v, self.cache_dtype, self.opts["v_scale"])
        else:
            k, v = k.to(self.cache_dtype), v.to(self.cache_dtype)
        rows = q_len if self.kernel == "prefill" else 1
        q = torch.randn(rows, self.hq, self.d, generator=gen).to(DTYPES[self.dtype])
        return k, v, q

    def run(self, seqs, *, page_seed: int, batch_invariant: bool):
        """Attention over a batch of ``(k, v, q)`` placed on pages chosen by ``page_seed`` -> per-sequence
        ``(out, lse)`` and the batch's pool (for the reference)."""
        k, v, bt, sl = pool_from_sequences([(s[0], s[1]) for s in seqs], page_size=self.p,
                                           cache_dtype=self.cache_dtype, seed=page_seed)
        q = torch.cat([s[2] for s in seqs]).to(DEVICE)
        rows = [s[2].shape[0] for s in seqs]
        if self.kernel == "decode":
            out, lse = tp.paged_decode(q, k, v, bt, sl, return_lse=True, batch_invariant=batch_invariant,
                                       **self.opts)
        else:
            cu = torch.tensor(np.concatenate([[0], np.cumsum(rows)]), dtype=torch.int32, device=DEVICE)
            out, lse = tp.paged_prefill(q, k, v, bt, sl, cu, return_lse=True, batch_invariant=batch_invariant,
                                        **self.opts)
        starts = np.concatenate([[0], np.cumsum(rows)])
        per_seq = [(out[a:b].cpu(), lse[a:b].cpu()) for a, b in zip(starts[:-1], starts[1:])]
        return per_seq, (q, k, v, bt, sl, rows)

    def reference(self, pool):
        q, k, v, bt, sl, rows = pool
        if self.kernel == "decode":
            return reference.decode(q, k, v, bt, sl, **self.opts)
        cu = torch.tensor(np.concatenate([[0], np.cumsum(rows)]), dtype=torch.int32)
        return reference.prefill(q, k, v, bt, sl, cu, **self.opts)


def _neighbour_lengths(count: int, seed: int, long_every: int = 5):
    """``count`` lengths: short and odd ones (1, 2, page edges, 97, 300, 1025) and every ``long_every``-th one much
    longer than the target (5000 to 6001 tokens)."""
    rng = np.random.default_rng(seed)
    short = [1, 2, 16, 17, 97, 300, 1025, 255, 5, 6]
    return [int(rng.integers(5000, 6002)) if i % long_every == long_every - 1 else int(rng.choice(short))
            for i in range(count)]


def _scenarios():
    """(label, neighbour lengths, target index, page seed): alone twice (different pages), batch 3 with the
    target first / middle / last, batch 17 with it first / in the middle / last."""
    out = [("alone", [], 0, 0), ("alone_other_pages", [], 0, 1)]
    for i, (idx, lens) in enumerate([(0, [6001, 1]), (1, [97, 5000]), (2, [2, 16])]):
        out.append((f"batch3_at{idx}", lens, idx, 10 + i))
    for i, idx in enumerate([0, 8, 16]):
        out.append((f"batch17_at{idx}", _neighbour_lengths(16, seed=20 + i), idx, 20 + i))
    return out


def _batches(case: Case, target: str):
    n, q_len = TARGETS[target]
    tgt = case.sequence(n, q_len, TARGET_SEED)
    for label, lens, idx, page_seed in _scenarios():
        neigh = [case.sequence(m, min(m, 1 + (j * 7) % 16), seed=page_seed * 100 + j) for j, m in enumerate(lens)]
        seqs = neigh[:idx] + [tgt] + neigh[idx:]
        yield label, seqs, idx, page_seed


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_batch_invariant_bitwise(name, target):
    case = Case(name)
    alone = None
    for label, seqs, idx, page_seed in _batches(case, target):
        per_seq, pool = case.run(seqs, page_seed=page_seed, batch_invariant=True)
        out, lse = per_seq[idx]
        if alone is None:
            alone = out, lse
            ref_out, ref_lse = case.reference(pool)
            assert_close(out, ref_out, ATOL[case.dtype])
            assert_close(lse, ref_lse, LSE_ATOL[case.dtype], "lse")
            continue
        assert torch.equal(out, alone[0]), f"{label}: out differs from the sequence alone " \
            f"(max {(out.double() - alone[0].double()).abs().max().item():.3g})"
        assert torch.equal(lse, alone[1]), f"{label}: lse differs from the sequence alone " \
            f"(max {(lse.double() - alone[1].double()).abs().max().item():.3g})"


@pytest.mark.parametrize("name", [n for n in CONFIGS if n.startswith("decode")])
def test_long_sequence_spans_several_invariant_splits(name):
    """The 5000-token sequence is split (several partial states merged) in batch-invariant mode, alone and in a
    batch, with the same number of splits: the bitwise test above covers the merge."""
    case = Case(name)
    n, _ = TARGETS["long"]
    first_key = 0 if case.window < 0 else n - 1 - case.window
    pages = -(-n // case.p) - first_key // case.p
    for lens in ([n], [n, 1, 6001]):
        table = torch.zeros(len(lens), -(-max(lens) // case.p), dtype=torch.int32)
        plan = tp.plan_decode(table, torch.tensor(lens, dtype=torch.int32), page_size=case.p, num_pages=1,
                              window_left=case.window, batch_invariant=True)
        assert plan.split_pages > 0 and -(-pages // plan.split_pages) > 1
        assert plan.num_splits >= -(-pages // plan.split_pages)


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_default_mode_within_tolerance(name, target):
    """batch_invariant=False: each placement of the sequence matches the reference within the dtype's tolerance
    (its bits may differ from one batch to another)."""
    case = Case(name)
    ref = None
    outs = []
    for label, seqs, idx, page_seed in _batches(case, target):
        per_seq, pool = case.run(seqs, page_seed=page_seed, batch_invariant=False)
        out, lse = per_seq[idx]
        if ref is None:
            assert label == "alone"
            ref_out, ref_lse = case.reference(pool)
            ref = ref_out, ref_lse
        assert_close(out, ref[0], ATOL[case.dtype], f"{label}: out")
        assert_close(lse, ref[1], LSE_ATOL[case.dtype], f"{label}: lse")
        outs.append(out)
    differing = sum(not torch.equal(o, outs[0]) for o in outs[1:])
    print(f"{name}/{target}: {differing} of {len(outs) - 1} placements differ bitwise from the sequence alone")
