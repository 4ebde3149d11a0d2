"""PagedKVCache end to end: scripted scenarios after TVM's paged-KV runtime tests (prefill/decode mixes, forks at
and around page boundaries, forks of forks, forks on recycled pages, prefix reuse after free), checked against the
dense float64 reference.

Every token has an id, and its K/V rows in layer ``l`` are a fixed function of (l, position, id): a sequence's
K/V history is then its token list, which the harness records (forks copy it, prefix hits share it). After every
step, the step's own attention output (decode or causal chunked prefill through ``PagedKVCache.attention``) is
checked, and then every live sequence, in the step or not, is probed with a decode over its whole history, so
a copy-on-write that corrupts a sibling is caught. Pools start filled with NaN: any read of an unwritten slot
shows up.
"""

import numpy as np
import pytest
import torch

from tvm_paged import reference
from tvm_paged.cache import OutOfPages, PagedKVCache
from tvm_paged.ops import paged_decode

PAGE, NUM_KV_HEADS, HEAD_DIM, GROUP, LAYERS, VOCAB = 16, 2, 64, 3, 2, 1000
NUM_QO_HEADS = NUM_KV_HEADS * GROUP
ATOL, RTOL = 2e-5, 1e-4  # float32 kernels against the float64 reference
MAX_POS = 512


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The reference's small torch ops: on a 2-core machine shared with the kernels' thread pool, more torch
    threads only contend (measured 12x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Harness:
    def __init__(self, num_pages: int, seed: int = 0):
        self.cache = PagedKVCache(LAYERS, NUM_KV_HEADS, HEAD_DIM, PAGE, num_pages)
        for c in self.cache.k_caches + self.cache.v_caches:
            c.fill_(float("nan"))
        g = torch.Generator().manual_seed(seed)
        # K/V of token t at position p in layer l: table[l][t] + pos_table[l][p]
        self.k_tok = torch.randn(LAYERS, VOCAB, NUM_KV_HEADS, HEAD_DIM, generator=g)
        self.v_tok = torch.randn(LAYERS, VOCAB, NUM_KV_HEADS, HEAD_DIM, generator=g)
        self.k_pos = torch.randn(LAYERS, MAX_POS, NUM_KV_HEADS, HEAD_DIM, generator=g)
        self.v_pos = torch.randn(LAYERS, MAX_POS, NUM_KV_HEADS, HEAD_DIM, generator=g)
        self.gen = g
        self.tokens: dict = {}  # seq id -> token ids it holds (its K/V history)
        self.steps = {"decode": 0, "prefill": 0}

    def kv(self, layer, tokens, positions):
        t, p = torch.as_tensor(tokens, dtype=torch.long), torch.as_tensor(positions, dtype=torch.long)
        return self.k_tok[layer, t] + self.k_pos[layer, p], self.v_tok[layer, t] + self.v_pos[layer, p]

    def random_tokens(self, n):
        return torch.randint(0, VOCAB, (n,), generator=self.gen).tolist()

    # -- sequence management mirrored in the record --
    def add(self, sid, prompt=None):
        cached = self.cache.add_sequence(sid, prompt)
        self.tokens[sid] = list(prompt[:cached]) if cached else []
        return cached

    def fork(self, parent, child):
        self.cache.fork(parent, child)
        self.tokens[child] = list(self.tokens[parent])

    def free(self, sid):
        self.cache.free(sid)
        del self.tokens[sid]

    def step(self, batch, token_ids=None):
        """``batch``: [(seq id, new tokens)]; ``token_ids``: {seq id: ids} for some of them (else random)."""
        token_ids = token_ids or {}
        ids = [sid for sid, _ in batch]
        new = [list(token_ids.get(sid, self.random_tokens(n))) for sid, n in batch]
        step = self.cache.begin_step(ids, [n for _, n in batch], token_ids=new)
        self.steps["decode" if step.is_decode else "prefill"] += 1
        for sid, toks in zip(ids, new):
            self.tokens[sid] += toks
        flat = [t for toks in new for t in toks]
        scale = HEAD_DIM ** -0.5
        for layer in range(LAYERS):
            k, v = self.kv(layer, flat, step.positions)
            self.cache.write(layer, step, k, v)
            q = torch.randn(len(flat), NUM_QO_HEADS, HEAD_DIM, generator=self.gen)
            out = self.cache.attention(layer, step, q)
            cu = step.cu_seqlens_q.tolist()
            for b, sid in enumerate(ids):
                hist = self.tokens[sid]
                kr, vr = self.kv(layer, hist, range(len(hist)))
                ref, _ = reference.attention(q[cu[b]:cu[b + 1]], kr, vr, scale=scale, causal=True,
                                             q_positions=step.positions[cu[b]:cu[b + 1]])
                torch.testing.assert_close(out[cu[b]:cu[b + 1]].double(), ref, atol=ATOL, rtol=RTOL,
                                           msg=lambda m: f"layer {layer}, sequence {sid!r}: {m}")
        self.probe()
        return step

    def probe(self):
        """Decode over the whole history of every live sequence (nothing appended): catches a page one
        sequence wrote that another one still reads."""
        live = [s for s, toks in self.tokens.items() if toks]
        if not live:
            return
        alloc = self.cache.allocator
        assert alloc.seq_lens(list(self.tokens)).tolist() == [len(t) for t in self.tokens.values()]
        assert alloc.seq_lens(live).tolist() == [len(self.tokens[s]) for s in live]
        table, lens = alloc.block_table(live), alloc.seq_lens(live)
        for layer in range(LAYERS):
            q = torch.randn(len(live), NUM_QO_HEADS, HEAD_DIM, generator=self.gen)
            out = paged_decode(q, self.cache.k_caches[layer], self.cache.v_caches[layer], table, lens)
            for b, sid in enumerate(live):
                hist = self.tokens[sid]
                kr, vr = self.kv(layer, hist, range(len(hist)))
                ref, _ = reference.attention(q[b:b + 1], kr, vr, scale=HEAD_DIM ** -0.5)
                torch.testing.assert_close(out[b:b + 1].double(), ref, atol=ATOL, rtol=RTOL,
                                           msg=lambda m: f"probe layer {layer}, sequence {sid!r}: {m}")


def test_prefill_and_decode_mix():
    """TVM's operation sequence: prefills of odd lengths (some over several steps), then decodes mixed in."""
    h = Harness(num_pages=64)
    for sid in range(9):
        h.add(sid)
    for batch in ([(0, 6)], [(1, 8)], [(2, 11)], [(3, 16)], [(4, 19), (5, 20)], [(6, 21), (7, 24)],
                  [(2, 5), (4, 7), (8, 24)], [(6, 13)], [(8, 19)], [(0, 1)], [(1, 3), (5, 19), (7, 11)]):
        h.step(batch)
    for _ in range(3):
        h.step([(sid, 1) for sid in (8, 2, 5, 0, 7)])  # decode, table rows out of id order
    h.step([(3, 1), (6, 17), (1, 1)])  # chunk and decodes in one prefill step
    assert h.steps == {"decode": 4, "prefill": 11}


@pytest.mark.parametrize("fork_len", [15, 16, 17, 33, 60])
def test_fork_at_length(fork_len):
    """Fork inside, at and just past a page boundary; parent and children then diverge by decode and chunks."""
    h = Harness(num_pages=40)
    h.add("p")
    first = min(fork_len, 7)
    h.step([("p", first)])
    if fork_len > first:
        h.step([("p", fork_len - first)])  # chunked prefill against the first chunk
    shared = h.cache.allocator.pages_of("p")
    h.fork("p", "c1")
    h.fork("p", "c2")
    assert h.cache.allocator.pages_of("c1") == shared
    free_before = h.cache.num_free_pages
    step = h.step([("c1", 1), ("p", 1)])
    assert step.is_decode
    # Two fresh pages either way: a new page each at a boundary, else a private copy each of the shared
    # partial page (c1 copies first, then p, which still shares it with c2); c2 keeps the original.
    assert free_before - h.cache.num_free_pages == 2
    a = h.cache.allocator
    if fork_len % PAGE:
        assert a.pages_of("c2") == shared and shared[-1] not in a.pages_of("c1") + a.pages_of("p")
    else:
        assert a.pages_of("c1")[:-1] == a.pages_of("p")[:-1] == shared
    h.step([("c2", 5), ("c1", 1), ("p", 20)])
    for _ in range(2):
        h.step([("p", 1), ("c2", 1), ("c1", 1)])
    assert h.cache.allocator.pages_of("c2")[: fork_len // PAGE] == shared[: fork_len // PAGE]  # full pages shared
    h.free("p")
    h.step([("c1", 3), ("c2", 1)])


def test_fork_on_recycled_pages():
    """Pages freed by finished sequences (still holding their old K/V) get reused, then forked from."""
    h = Harness(num_pages=12)
    for sid in ("a", "b", "c"):
        h.add(sid)
    h.step([("a", 40), ("b", 30), ("c", 50)])  # 3 + 2 + 4 pages
    h.free("a")
    h.free("c")
    h.add("d")
    h.step([("d", 37), ("b", 1)])
    h.fork("d", "e")
    h.step([("e", 1), ("d", 2)])
    h.fork("e", "f")
    h.free("b")
    h.step([("f", 12), ("e", 1), ("d", 1)])
    for _ in range(2):
        h.step([("d", 1), ("e", 1), ("f", 1)])


def test_fork_chain():
    """0 <- 1 <- 2, 3 and 0 <- 4, forks of forks at different lengths (TVM's 0 <- 5 <- 6,8,9), then a mixed
    step of decodes and chunks over the whole family."""
    h = Harness(num_pages=48)
    h.add(0)
    h.step([(0, 21)])
    h.fork(0, 1)
    h.step([(1, 14)])  # 1 at 35
    h.fork(1, 2)
    h.fork(1, 3)
    h.step([(2, 1), (3, 12)])
    h.fork(0, 4)
    h.step([(4, 3), (0, 1)])
    h.fork(3, 5)  # fork of a fork of a fork
    for _ in range(2):
        h.step([(sid, 1) for sid in (5, 4, 3, 2, 1, 0)])
    h.free(1)
    h.step([(2, 10), (5, 1), (0, 17), (3, 1)])


def test_prefix_reuse_after_free():
    """A finished prompt's full pages serve a later prompt with the same prefix, and a live one's serve a
    concurrent prompt; only whole pages are shared and the shared prefix reads back right."""
    h = Harness(num_pages=32)
    prompt = h.random_tokens(45)
    assert h.add("a", prompt) == 0
    h.step([("a", 30)], {"a": prompt[:30]})
    h.step([("a", 15)], {"a": prompt[30:]})
    h.step([("a", 1)])
    h.free("a")
    other = prompt[:40] + h.random_tokens(9)
    assert h.add("b", other) == 32  # two full pages cached; the third (32..47) differs after token 40
    assert h.tokens["b"] == prompt[:32]
    h.step([("b", 17)], {"b": other[32:]})  # prefill against the cached prefix
    assert h.add("c", prompt) == 32  # "b" holds the same two pages: shared while both live
    assert h.cache.allocator.pages_of("c")[:2] == h.cache.allocator.pages_of("b")[:2]
    h.step([("c", 13), ("b", 1)], {"c": prompt[32:]})
    assert h.add("d", prompt[:16]) == 0  # never the whole prompt
    h.step([("d", 16)], {"d": prompt[:16]})
    h.step([("b", 1), ("c", 1), ("d", 1)])


def _state(h):
    a, live = h.cache.allocator, list(h.tokens)
    return a.num_free_pages, [a.pages_of(s) for s in live], a.seq_lens(live).tolist(), a.block_table(live).tolist()


def test_out_of_pages_is_atomic_and_exact():
    h = Harness(num_pages=6)
    h.add("a")
    h.step([("a", 20)])  # 2 pages, second partial
    h.fork("a", "b")
    h.add("x")
    h.step([("x", 40)])  # 3 pages: 1 free
    # a and b share a partly filled page: only the first writer copies it, so this fits in the last page
    assert h.cache.pages_needed(["a", "b"], 1) == 1 and h.cache.pages_needed(["b"], 1) == 1
    assert h.cache.can_begin_step(["a", "b"], 1)
    h.step([("a", 1), ("b", 1)])
    assert h.cache.num_free_pages == 0
    before = _state(h)
    k_before = h.cache.k_caches[0].clone()
    assert not h.cache.can_begin_step(["a", "x", "b"], [1, 9, 1])
    with pytest.raises(OutOfPages):
        h.cache.begin_step(["a", "x", "b"], [1, 9, 1])  # a and b fit, x does not: a must not have grown
    assert _state(h) == before
    assert torch.equal(k_before.nan_to_num(7.0), h.cache.k_caches[0].nan_to_num(7.0))
    h.step([("a", 1), ("x", 8), ("b", 1)])  # exactly what is left


def test_step_argument_errors_change_nothing():
    h = Harness(num_pages=8)
    h.add("a")
    h.step([("a", 5)])
    before = _state(h)
    for args, exc in ((( ["a", "a"], 1), ValueError), ((["a"], [0]), ValueError), ((["a", "zz"], 1), KeyError),
                      ((["a"], [1, 2]), ValueError), ((["a"], 2, [[1]]), ValueError), (([], 1), ValueError),
                      ((["a"], [2.7]), ValueError), ((["a"], 1.0), ValueError), ((["a"], True), ValueError)):
        with pytest.raises(exc):
            h.cache.begin_step(*args)
        assert _state(h) == before


def test_layer_and_constructor_errors():
    """A layer index outside [0, num_layers) (negative ones included: no wrap-around to the last layer) and bad
    constructor arguments raise ValueError naming the argument."""
    h = Harness(num_pages=8)
    h.add("a")
    step = h.cache.begin_step(["a"], 3)
    k = torch.randn(3, h.cache.num_kv_heads, h.cache.head_dim)
    for layer in (-1, h.cache.num_layers, 1.0, True):
        with pytest.raises(ValueError, match="^layer: "):
            h.cache.write(layer, step, k, k)
        with pytest.raises(ValueError, match="^layer: "):
            h.cache.attention(layer, step, torch.randn(3, 4, h.cache.head_dim))
    base = dict(num_layers=2, num_kv_heads=2, head_dim=16, page_size=5, num_pages=8)
    for name, value in (("num_layers", 2.5), ("num_kv_heads", 0), ("head_dim", -1), ("page_size", "5"),
                        ("num_pages", 0), ("dtype", torch.float64), ("device", "nowhere")):
        with pytest.raises(ValueError, match=f"^{name}: "):
            PagedKVCache(**{**base, name: value})


def test_pages_needed_is_exact_under_random_forks_and_frees():
    """pages_needed (which decides OutOfPages before anything changes) against what steps really take, with
    forks mid-page, forks of forks, frees and a pool that keeps running out. No attention here."""
    rng = np.random.default_rng(1)
    cache = PagedKVCache(1, NUM_KV_HEADS, HEAD_DIM, PAGE, 24)
    live, next_id, refused, copies = [], 0, 0, 0
    for _ in range(300):
        op = rng.random()
        if op < 0.15 or not live:
            cache.add_sequence(next_id)
            n = int(rng.integers(1, 40))
            if cache.can_begin_step([next_id], n):
                cache.begin_step([next_id], n)
            live.append(next_id)
            next_id += 1
            if cache.seq_len(live[-1]) == 0:
                cache.free(live.pop())
        elif op < 0.35:
            parent = live[int(rng.integers(len(live)))]
            cache.fork(parent, next_id)
            live.append(next_id)
            next_id += 1
        elif op < 0.5 and len(live) > 1:
            cache.free(live.pop(int(rng.integers(len(live)))))
        else:
            k = int(rng.integers(1, len(live) + 1))
            ids = [live[i] for i in rng.choice(len(live), k, replace=False)]
            ns = rng.integers(1, 6, k).tolist()
            need, free = cache.pages_needed(ids, ns), cache.num_free_pages
            if need <= free:
                step = cache.begin_step(ids, ns)
                assert free - cache.num_free_pages == need
                copies += step.copied_pages
            else:
                refused += 1
                lens = [cache.seq_len(i) for i in live]
                with pytest.raises(OutOfPages):
                    cache.begin_step(ids, ns)
                assert cache.num_free_pages == free and [cache.seq_len(i) for i in live] == lens
    assert refused > 10 and copies > 10, (refused, copies)
