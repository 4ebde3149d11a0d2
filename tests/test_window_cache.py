"""PagedKVCache with a sliding window, attention options and fp8 caches, end to end against the float64 reference.

The windowed cache drops pages behind the window as sequences grow (``tvm_paged.allocator``). The test keeps every
sequence's full K/V history apart from the cache (a token's K/V rows are a fixed function of its id and position,
as in ``test_cache``), and checks each step's attention against ``reference.prefill`` / ``reference.decode`` over
that whole, never-dropped history with the same ``window_left``: equal results prove the dropped pages were never
needed. Pools start filled with NaN (after checking the constructor's zeros), so reading a slot never written, or
a dropped page reused by another sequence, shows up.

Shapes: page size 5, 8 query heads over 2 KV heads, head_dim 64, window 12 (a query sees 13 keys: three pages and
a bit); one kernel configuration per kind (plain window, window with every option, fp8 with window).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tvm_paged import reference
from tvm_paged.cache import PagedKVCache
from paged_data import ATOL, DEVICE, alibi_slopes, assert_close, dense_table

PAGE, HKV, HQ, D, LAYERS, W = 5, 2, 8, 64, 2, 12
VOCAB, MAX_POS = 1000, 400
E4M3 = torch.float8_e4m3fn


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The reference's small torch ops contend with the kernels' thread pool on a small machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ceil_div(a, b):
    return -(-a // b)


class Harness:
    """A windowed cache plus each live sequence's token ids (its K/V history, never dropped)."""

    def __init__(self, num_pages, seed=0, **cache_kw):
        self.cache = PagedKVCache(LAYERS, HKV, D, PAGE, num_pages, device=DEVICE, window_left=W, **cache_kw)
        for c in self.cache.k_caches + self.cache.v_caches:
            assert c.dtype == self.cache.kv_dtype and not c.float().any()  # zeros, fp8 included
            c.fill_(float("nan"))
        g = self.gen = torch.Generator().manual_seed(seed)
        # K/V of token t at position p in layer l: tok[l, t] + pos[l, p], clamped (never zero in practice)
        self.k_tok, self.v_tok, self.k_pos, self.v_pos = (
            torch.randn(LAYERS, n, HKV, D, generator=g) for n in (VOCAB, VOCAB, MAX_POS, MAX_POS))
        self.tokens: dict = {}
        self.steps = {"decode": 0, "prefill": 0}
        self.max_held = 0

    def kv(self, layer, tokens, positions):
        t, p = torch.as_tensor(tokens, dtype=torch.long), torch.as_tensor(positions, dtype=torch.long)
        k = (self.k_tok[layer, t] + self.k_pos[layer, p]).clamp(-3, 3)
        v = (self.v_tok[layer, t] + self.v_pos[layer, p]).clamp(-3, 3)
        return k, v

    def random_tokens(self, n):
        return torch.randint(0, VOCAB, (n,), generator=self.gen).tolist()

    def add(self, sid, prompt):
        cached = self.cache.add_sequence(sid, prompt)
        self.tokens[sid] = list(prompt[:cached])
        return cached

    def fork(self, parent, child):
        self.cache.fork(parent, child)
        self.tokens[child] = list(self.tokens[parent])

    def free(self, sid):
        self.cache.free(sid)
        del self.tokens[sid]

    def history(self, layer, ids):
        """The full K/V histories of ``ids`` back to back, as page-size-1 caches, with their table and lengths."""
        lens = [len(self.tokens[s]) for s in ids]
        ks, vs = zip(*(self.kv(layer, self.tokens[s], range(len(self.tokens[s]))) for s in ids))
        return torch.cat(ks)[:, None], torch.cat(vs)[:, None], dense_table(lens), torch.tensor(lens, dtype=torch.int32)

    def step(self, batch, token_ids=None, known_ids=True, **options):
        """``batch``: [(seq id, new tokens)]; ``token_ids``: {seq id: ids} for some of them (else random);
        ``known_ids``: give the cache the ids (full pages enter the prefix cache); ``options``: attention options
        passed to ``PagedKVCache.attention`` and to the reference."""
        cache, token_ids = self.cache, token_ids or {}
        ids, ns = [s for s, _ in batch], [n for _, n in batch]
        new = [list(token_ids.get(s, self.random_tokens(n))) for s, n in batch]
        free0, need = cache.num_free_pages, cache.pages_needed(ids, ns)
        assert cache.can_begin_step(ids, ns) == (need <= free0)
        step = cache.begin_step(ids, ns, token_ids=new if known_ids else None)
        assert free0 - cache.num_free_pages == need  # the window's drops included (need may be negative)
        assert step.plan.window_left == W
        self.steps["decode" if step.is_decode else "prefill"] += 1
        old = {s: len(self.tokens[s]) for s in ids}
        for s, toks in zip(ids, new):
            self.tokens[s] += toks
        self.check_tables(step, old)
        flat = [t for toks in new for t in toks]
        for layer in range(LAYERS):
            k, v = self.kv(layer, flat, step.positions)
            cache.write(layer, step, k.to(DEVICE), v.to(DEVICE))
            q = torch.randn(len(flat), HQ, D, generator=self.gen).to(DEVICE)
            out = cache.attention(layer, step, q, **options)
            hk, hv, table, lens = self.history(layer, ids)
            assert lens.tolist() == step.seq_lens.tolist()
            if step.is_decode:
                ref, _ = reference.decode(q, hk, hv, table, lens, window_left=W, **options)
            else:
                ref, _ = reference.prefill(q, hk, hv, table, lens, step.cu_seqlens_q, causal=True, window_left=W,
                                           **options)
            assert_close(out, ref, ATOL["float32"], f"layer {layer}")
        return step

    def check_tables(self, step, old):
        """Each row: -1 exactly for the pages wholly behind the step's first query's window, then real pages; held
        pages as the allocator reports them."""
        alloc = self.cache.allocator
        table = step.block_table.tolist()
        for b, sid in enumerate(step.seq_ids):
            n = len(self.tokens[sid])
            dropped = max(0, (old[sid] - W) // PAGE)
            row = table[b][:ceil_div(n, PAGE)]
            assert row[:dropped] == [-1] * dropped and min(row[dropped:]) >= 0, (sid, row)
            assert alloc.pages_of(sid) == row and alloc.seq_len(sid) == n
            self.max_held = max(self.max_held, len(row) - dropped)


def test_windowed_cache_matches_the_full_history():
    """11 prompts of odd lengths (1 .. 97) in two chunked-prefill steps, forks up to batch 17, 40 decode steps,
    finished sequences replaced by prompts hitting the prefix cache (pages the window had dropped included): every
    step's attention equals the reference over the never-dropped history, in a pool far smaller than the
    histories."""
    num_pages = 130
    h = Harness(num_pages)
    lens = [1, 4, 5, 6, 12, 13, 17, 29, 41, 60, 97]
    prompts = {i: h.random_tokens(n) for i, n in enumerate(lens)}
    for i, p in prompts.items():
        assert h.add(i, p) == 0
    first = {i: ceil_div(n, 2) for i, n in enumerate(lens)}
    h.step([(i, first[i]) for i in prompts], {i: prompts[i][:first[i]] for i in prompts})
    rest = [(i, n - first[i]) for i, n in enumerate(lens) if n > first[i]]
    h.step(rest, {i: prompts[i][first[i]:] for i, _ in rest})  # chunks against the cached (windowed) prefix
    for parent, child in zip((10, 9, 8, 2, 1, 0), range(11, 17)):  # forks mid-page and at boundaries
        h.fork(parent, child)
    a = h.cache.allocator
    assert a.pages_of(11) == a.pages_of(10) and a.pages_of(11)[:7] == [-1] * 7
    live = list(h.tokens)
    assert len(live) == 17
    for t in range(40):
        if t == 20:  # two finish; two new prompts reuse cached pages, some dropped behind the window
            h.free(3)
            h.free(10)
            assert h.add("again", prompts[10]) == 95  # every full page of the 97 prompt: dropped ones from the LRU
            assert h.add("half", prompts[9][:33]) == 30
            h.step([("again", 2), ("half", 3), (0, 1)], {"again": prompts[10][95:], "half": prompts[9][30:33]})
            live = list(h.tokens)
            assert len(live) == 17
        # Decoded ids unknown to the cache: the prefix cache's LRU then holds prompt pages only (the pool cannot
        # keep every generated page too), so the prompts' pages are still there at t == 20.
        step = h.step([(s, 1) for s in reversed(live)], known_ids=False)  # table rows out of id order
        assert step.is_decode
    assert h.steps == {"decode": 40, "prefill": 3}
    assert h.max_held <= ceil_div(97 - ceil_div(97, 2) + W, PAGE) + 1  # the second chunk of the longest prompt
    held = sum(len([p for p in a.pages_of(s) if p >= 0]) for s in h.tokens)
    assert held + h.cache.num_free_pages == num_pages
    unwindowed = sum(ceil_div(len(t), PAGE) for t in h.tokens.values())
    assert unwindowed > num_pages  # without the drops this would not have fit
    for s in list(h.tokens):
        h.free(s)
    assert h.cache.num_free_pages == num_pages


def test_windowed_cache_forwards_attention_options():
    """Soft cap, ALiBi, sinks and a custom scale reach the kernels through ``attention``, over chunked prefills
    (pages dropped between chunks) and decodes."""
    h = Harness(40, seed=1)
    options = dict(scale=0.11, logits_soft_cap=30.0, alibi_slopes=alibi_slopes(HQ),
                   sinks=torch.linspace(-1.0, 2.0, HQ, dtype=torch.float32).to(DEVICE))
    for sid, n in (("a", 41), ("b", 23), ("c", 8)):
        h.add(sid, h.random_tokens(n))
    h.step([("a", 9), ("b", 7), ("c", 8)], **options)
    h.step([("a", 9), ("b", 16)], **options)
    h.step([("a", 23), ("c", 1)], **options)  # a prefill chunk and a decode in one step
    for _ in range(3):
        h.step([("c", 1), ("a", 1), ("b", 1)], **options)
    assert h.cache.allocator.pages_of("a")[:5] == [-1] * 5


def test_fp8_cache_step_matches_the_dequantized_cache():
    """An e4m3 cache with per-layer scales (a float, a per-head tensor, one of each per layer): write quantizes
    with the layer's scales (bitwise as ``reference.quantize_kv``), attention reads with them, against the
    reference over the dequantized cache (dropped pages included as -1) and close to the unquantized history."""
    # 3 / scale (clamped values) is never halfway between two codes: the CPU write_kv, compiled with LLVM's arcp,
    # multiplies by 1 / scale and can round such a tie the other way (3 / 0.015 does).
    k_scale = [0.02, torch.tensor([0.016, 0.035], dtype=torch.float32)]  # a CPU tensor: moved to the cache's device
    v_scale = [torch.tensor([0.025, 0.01], dtype=torch.float32).to(DEVICE), 0.0125]
    h = Harness(40, seed=2, kv_dtype=E4M3, k_scale=k_scale, v_scale=v_scale)
    cache = h.cache
    assert cache.kv_dtype == E4M3 and cache.dtype == torch.float32
    assert cache.k_scales[0] == 0.02 and cache.k_scales[1].device == DEVICE
    for sid, n in (("a", 23), ("b", 9)):
        h.add(sid, h.random_tokens(n))
    batches = [[("a", 23), ("b", 9)], [("b", 7), ("a", 1)], [("a", 1), ("b", 1)], [("b", 1), ("a", 1)]]
    for batch in batches:
        ids, ns = [s for s, _ in batch], [n for _, n in batch]
        new = [h.random_tokens(n) for n in ns]
        step = cache.begin_step(ids, ns, token_ids=new)
        for s, toks in zip(ids, new):
            h.tokens[s] += toks
        flat = [t for toks in new for t in toks]
        for layer in range(LAYERS):
            k, v = h.kv(layer, flat, step.positions)
            cache.write(layer, step, k.to(DEVICE), v.to(DEVICE))
            ks, vs = cache.k_scales[layer], cache.v_scales[layer]
            slots = step.slot_mapping
            for got, x, scale in ((cache.k_caches[layer], k, ks), (cache.v_caches[layer], v, vs)):
                codes = got.view(-1, HKV, D)[slots].view(torch.uint8).cpu()
                assert torch.equal(codes, reference.quantize_kv(x, E4M3, scale).view(torch.uint8))
            q = torch.randn(len(flat), HQ, D, generator=h.gen).to(DEVICE)
            out = cache.attention(layer, step, q)
            kc, vc = cache.k_caches[layer], cache.v_caches[layer]
            args = (q, kc, vc, step.block_table, step.seq_lens)
            if step.is_decode:
                ref, _ = reference.decode(*args, window_left=W, k_scale=ks, v_scale=vs)
            else:
                ref, _ = reference.prefill(*args, step.cu_seqlens_q, window_left=W, k_scale=ks, v_scale=vs)
            assert_close(out, ref, ATOL["float32"], f"layer {layer}")
            hk, hv, table, lens = h.history(layer, ids)
            if step.is_decode:
                dense, _ = reference.decode(q, hk, hv, table, lens, window_left=W)
            else:
                dense, _ = reference.prefill(q, hk, hv, table, lens, step.cu_seqlens_q, window_left=W)
            assert (dense - ref).abs().max() < 0.2  # e4m3 rounding, 2^-4 relative at most
    assert cache.allocator.pages_of("a")[:2] == [-1, -1]


def test_constructor_checks():
    c = PagedKVCache(2, HKV, D, PAGE, 4)
    assert (c.window_left, c.kv_dtype, c.k_scales, c.v_scales) == (-1, torch.float32, [1.0, 1.0], [1.0, 1.0])
    assert c.allocator.window_left == -1
    c = PagedKVCache(2, HKV, D, PAGE, 4, dtype=torch.float16, kv_dtype=torch.float16, window_left=0)
    assert c.k_caches[1].dtype == torch.float16 and c.allocator.window_left == 0
    head = torch.tensor([0.5, 2.0], dtype=torch.float32)
    bad = [
        (dict(window_left=-2), "window_left"),
        (dict(window_left=2.5), "window_left"),
        (dict(kv_dtype=torch.float16), "kv_dtype"),  # a cache of another float dtype than q's
        (dict(kv_dtype=torch.int8), "kv_dtype"),
        (dict(dtype=E4M3), "dtype"),  # 8-bit is the cache's dtype, not q's
        (dict(k_scale=2.0), "k_scale"),  # scales are for 8-bit caches only
        (dict(v_scale=head), "v_scale"),
        (dict(kv_dtype=E4M3, k_scale=[1.0]), "k_scale"),  # one per layer
        (dict(kv_dtype=E4M3, v_scale=[0.5, -1.0]), r"v_scale\[1\]"),
        (dict(kv_dtype=E4M3, k_scale=torch.tensor([0.5, 2.0, 1.0])), "k_scale"),
        (dict(kv_dtype=E4M3, k_scale=head.double()), "k_scale"),
        (dict(kv_dtype=E4M3, k_scale=float("inf")), "k_scale"),
    ]
    for kw, name in bad:
        with pytest.raises(ValueError, match=name):
            PagedKVCache(2, HKV, D, PAGE, 4, **kw)
    c = PagedKVCache(2, HKV, D, PAGE, 4, kv_dtype=torch.float8_e5m2, k_scale=[head, 0.5], v_scale=np.float32(3.0))
    assert torch.equal(c.k_scales[0], head) and c.k_scales[1] == 0.5 and c.v_scales == [3.0, 3.0]
    assert c.v_caches[0].dtype == torch.float8_e5m2 and not c.v_caches[0].float().any()
