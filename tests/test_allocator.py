"""Tests for tvm_paged.allocator: scripted cases plus a hypothesis state machine.

The state machine also simulates the KV cache itself (one token value per slot): copies from
pop_copies are applied, then the pending slot writes, and every live sequence must then read its
own tokens back through pages_of. That catches copy-on-write and prefix-cache bugs end to end.
One module (about 500 lines) on purpose: the scripted cases and the state machine check the same small class and
share its helpers; split, each half would repeat them.
"""
import pickle
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tvm_paged.allocator import OutOfPages, PageAllocator


def snapshot(a):
    """All allocator state, whatever its attributes are called, for 'nothing changed' checks.

    Pickle is faithful and keeps dict order (LRU order must not move either); an untouched
    allocator pickles to the same bytes.
    """
    return pickle.dumps(vars(a))


def ceil_div(a, b):
    return -(-a // b)


def expected_slots(pages, start, n, ps):
    return [pages[p // ps] * ps + p % ps for p in range(start, start + n)]


# --------------------------------------------------------------------------------------------
# scripted tests
# --------------------------------------------------------------------------------------------
def test_slots_and_block_table_basics():
    a = PageAllocator(num_pages=8, page_size=4)
    assert (a.num_pages, a.page_size, a.num_free_pages) == (8, 4, 8)
    assert a.add_sequence("a") == 0
    slots = a.append_slots("a", 6)
    assert slots.dtype == np.int64 and slots.shape == (6,)
    pages = a.pages_of("a")
    assert len(pages) == 2 and slots.tolist() == expected_slots(pages, 0, 6, 4)
    one = a.append_slots("a", 1)
    assert one.dtype == np.int64 and one.tolist() == [pages[1] * 4 + 2]
    assert a.append_slots("a", 0).shape == (0,)
    a.add_sequence("empty")
    bt = a.block_table(["empty", "a"])
    assert bt.dtype == np.int32 and bt.tolist() == [[-1, -1], pages]
    assert a.block_table([]).shape == (0, 1)
    assert a.block_table(["empty"]).tolist() == [[-1]]
    assert a.seq_lens(["a", "empty"]).tolist() == [7, 0] and a.seq_lens(["a"]).dtype == np.int32
    assert a.seq_len("a") == 7 and a.num_free_pages == 6
    a.pages_of("a").append(99)  # a copy
    assert a.pages_of("a") == pages
    src, dst = a.pop_copies()
    assert src.dtype == dst.dtype == np.int32 and src.shape == dst.shape == (0,)


def test_block_table_grows_past_initial_capacity():
    a = PageAllocator(num_pages=64, page_size=1)
    for i in range(20):
        a.add_sequence(i)
    a.append_slots(3, 30)
    a.append_slots(19, 2)
    bt = a.block_table(range(20))
    assert bt.shape == (20, 30)
    assert bt[3].tolist() == a.pages_of(3) and bt[19, :2].tolist() == a.pages_of(19)
    assert (bt[19, 2:] == -1).all() and (bt[0] == -1).all()
    a.free(3)
    a.add_sequence("new")  # reuses row 3's storage: must come back clean
    assert a.block_table(["new"]).tolist() == [[-1]]
    a.append_slots("new", 1)
    assert a.block_table(["new", 19]).tolist() == [a.pages_of("new") + [-1], a.pages_of(19)]


def test_fork_at_page_boundary_copies_nothing():
    a = PageAllocator(num_pages=8, page_size=4)
    a.add_sequence("a")
    a.append_slots("a", 8)
    a.fork("a", "b")
    assert a.pages_of("b") == a.pages_of("a") and a.seq_len("b") == 8
    assert a.num_free_pages == 6
    sa, sb = a.append_slots("a", 1), a.append_slots("b", 1)
    src, dst = a.pop_copies()
    assert len(src) == len(dst) == 0
    pa, pb = a.pages_of("a"), a.pages_of("b")
    assert pa[:2] == pb[:2] and pa[2] != pb[2]
    assert sa.tolist() == [pa[2] * 4] and sb.tolist() == [pb[2] * 4]


def test_fork_mid_page_copies_once_per_shared_write():
    a = PageAllocator(num_pages=16, page_size=4)
    a.add_sequence("a")
    a.append_slots("a", 6)
    shared = a.pages_of("a")
    a.fork("a", "b")
    a.fork("a", "c")  # three holders of a partly filled page
    free0 = a.num_free_pages

    sa = a.append_slots("a", 1)  # shared partial page: copy it
    src, dst = a.pop_copies()
    pa = a.pages_of("a")
    assert src.tolist() == [shared[1]] and dst.tolist() == [pa[1]] and pa[0] == shared[0]
    assert sa.tolist() == [pa[1] * 4 + 2] and a.num_free_pages == free0 - 1

    a.append_slots("a", 3)  # a's page is private now: no copy (and a new page at offset 0)
    assert len(a.pop_copies()[0]) == 0

    a.append_slots("b", 1)  # still shared with c: copy
    src, dst = a.pop_copies()
    assert src.tolist() == [shared[1]] and dst.tolist() == [a.pages_of("b")[1]]

    sc = a.append_slots("c", 1)  # c is the last holder: writes in place
    assert len(a.pop_copies()[0]) == 0
    assert a.pages_of("c") == shared and sc.tolist() == [shared[1] * 4 + 2]
    assert len({a.pages_of(s)[1] for s in "abc"}) == 3

    # copies are queued in order and popped once
    a.fork("c", "d")
    a.fork("c", "e")
    a.append_slots("d", 1)
    a.append_slots("e", 2)
    src, dst = a.pop_copies()
    assert src.tolist() == [shared[1], shared[1]]
    assert dst.tolist() == [a.pages_of("d")[1], a.pages_of("e")[1]]
    assert len(a.pop_copies()[0]) == 0


def test_copy_on_write_plus_new_page_in_one_append():
    a = PageAllocator(num_pages=8, page_size=4)
    a.add_sequence("a")
    a.append_slots("a", 3)
    a.fork("a", "b")
    slots = a.append_slots("b", 6)  # copy of the partial page + 1 new page
    pb = a.pages_of("b")
    assert len(pb) == 3 and slots.tolist() == expected_slots(pb, 3, 6, 4)
    assert a.pop_copies()[0].tolist() == a.pages_of("a")
    assert a.num_free_pages == 8 - 1 - 3


def test_prefix_reuse_after_free():
    a = PageAllocator(num_pages=16, page_size=4)
    prompt = list(range(100, 110))  # 10 tokens: 2 full pages + 2
    assert a.add_sequence("a", prompt) == 0
    a.append_slots("a", 10, prompt)
    pages = a.pages_of("a")
    a.free("a")
    assert a.num_free_pages == 16
    assert a.add_sequence("b", prompt) == 8  # both full pages
    assert a.pages_of("b") == pages[:2] and a.seq_len("b") == 8
    assert a.num_free_pages == 14  # taken back out of the free pool
    a.append_slots("b", 2, prompt[8:])
    # another sequence with the same prefix shares the pages while b is live
    assert a.add_sequence("c", prompt[:9] + [7, 7]) == 8
    assert a.pages_of("c") == pages[:2]
    # the one-token rule: a prompt of exactly 8 tokens leaves its last page to compute
    assert a.add_sequence("d", prompt[:8]) == 4
    assert a.add_sequence("e", prompt[:5]) == 4
    assert a.add_sequence("f", prompt[:4]) == 0
    # numpy token ids work the same
    assert a.add_sequence("g", np.array(prompt, dtype=np.int64)) == 8
    # a prefix that diverges in page 2 reuses page 1 only
    assert a.add_sequence("h", prompt[:4] + [0, 0, 0, 0, 0]) == 4
    # same second page after a different first page: the chained hash does not match
    assert a.add_sequence("i", [0, 0, 0, 0] + prompt[4:]) == 0
    assert a.add_sequence("j", []) == 0 and a.add_sequence("k", None) == 0


def test_prefix_hash_is_chained_and_incremental():
    a = PageAllocator(num_pages=16, page_size=4)
    a.add_sequence("a")
    for t in range(13):  # decode-style: one token at a time, ids known
        a.append_slots("a", 1, [t])
    a.free("a")
    assert a.add_sequence("b", list(range(13))) == 12
    # appending without token ids breaks the chain from there on
    a.add_sequence("c")
    a.append_slots("c", 4, [9, 9, 9, 9])
    a.append_slots("c", 4)
    a.append_slots("c", 4, [9, 9, 9, 9])
    a.free("c")
    assert a.add_sequence("d", [9] * 13) == 4
    # a fork keeps the parent's chain state, also through a copy-on-write of the partial page
    a.add_sequence("e")
    a.append_slots("e", 2, [5, 6])
    a.fork("e", "f")
    a.append_slots("f", 3, [7, 8, 1])
    assert len(a.pop_copies()[0]) == 1
    a.append_slots("e", 2, [9, 9])  # e's own partial ids are still [5, 6]
    a.free("e")
    a.free("f")
    assert a.add_sequence("g", [5, 6, 7, 8, 1]) == 4
    assert a.add_sequence("h", [5, 6, 9, 9, 1]) == 4


def test_cached_free_pages_evicted_lru_after_plain_pages():
    a = PageAllocator(num_pages=6, page_size=2)
    for sid, toks in (("a", [1, 1]), ("b", [2, 2]), ("c", [3, 3])):
        a.add_sequence(sid)
        a.append_slots(sid, 2, toks)
    pa, pb, pc = (a.pages_of(s)[0] for s in "abc")
    a.free("b")
    a.free("a")
    a.free("c")  # cached free, LRU order: b, a, c
    assert a.num_free_pages == 6
    a.add_sequence("x")
    a.append_slots("x", 6)  # 3 pages: the 3 never-cached pages go first
    assert not {pa, pb, pc} & set(a.pages_of("x"))
    assert a.add_sequence("probe", [1, 1, 0]) == 2  # a hit: out of the pool ...
    assert a.num_free_pages == 2
    a.free("probe")  # ... and back as the most recently used: b, c, a
    a.append_slots("x", 2)  # evicts b
    assert a.pages_of("x")[-1] == pb
    assert a.add_sequence("pb", [2, 2, 0]) == 0
    a.append_slots("x", 2)  # evicts c
    assert a.pages_of("x")[-1] == pc
    assert a.add_sequence("pc", [3, 3, 0]) == 0
    assert a.add_sequence("pa", [1, 1, 0]) == 2
    assert a.num_free_pages == 0


def test_free_releases_tail_first_for_lru():
    a = PageAllocator(num_pages=3, page_size=2)
    a.add_sequence("a")
    a.append_slots("a", 6, [1, 2, 3, 4, 5, 6])
    a.free("a")  # all cached free; the tail must be evicted first
    a.add_sequence("x")
    a.append_slots("x", 1)
    assert a.add_sequence("p", [1, 2, 3, 4, 5, 6, 7]) == 4


def test_duplicate_full_pages_first_one_stays_cached():
    a = PageAllocator(num_pages=8, page_size=2)
    for sid in "ab":
        a.add_sequence(sid)
        a.append_slots(sid, 2, [4, 4])
    first = a.pages_of("a")[0]
    a.free("b")  # its page is not in the cache: plain free
    a.free("a")
    assert a.add_sequence("c", [4, 4, 4]) == 2 and a.pages_of("c") == [first]


def test_constructor_errors():
    for args in ((0, 4), (4, 0), (-1, 4), (4, -2), (4.7, 2), (4, 2.5), ("4", 4), (True, 4)):
        with pytest.raises(ValueError, match="^(num_pages|page_size): "):
            PageAllocator(*args)


def test_errors_leave_state_unchanged():
    a = PageAllocator(num_pages=4, page_size=2)
    a.add_sequence("a", [1, 2, 3])
    a.append_slots("a", 3, [1, 2, 3])
    a.fork("a", "b")
    before = snapshot(a)

    def unchanged(exc, fn, *args, match=None):
        with pytest.raises(exc, match=match):
            fn(*args)
        assert snapshot(a) == before

    for fn, args in ((a.append_slots, ("zz", 1)), (a.free, ("zz",)), (a.fork, ("zz", "c")),
                     (a.seq_len, ("zz",)), (a.pages_of, ("zz",)), (a.block_table, (["a", "zz"],)),
                     (a.seq_lens, (["zz"],)), (a.can_append, ("zz", 1))):
        unchanged(KeyError, fn, *args, match="zz")
    unchanged(ValueError, a.add_sequence, "a", match="exists")
    unchanged(ValueError, a.add_sequence, "b", [1, 2, 3])
    unchanged(ValueError, a.fork, "a", "b", match="exists")
    unchanged(ValueError, a.fork, "a", "a")
    unchanged(ValueError, a.append_slots, "a", -1, match="num_tokens")
    unchanged(ValueError, a.append_slots, "a", 2, [1], match="token_ids")
    unchanged(ValueError, a.append_slots, "a", 0, [1], match="token_ids")
    unchanged(ValueError, a.append_slots, "a", 1, [1.5], match="token_ids")  # hashed: integers only
    unchanged(ValueError, a.append_slots, "a", 1.0, match="num_tokens")
    unchanged(ValueError, a.can_append, "a", -1, match="num_tokens")
    # Batch calls: one count (and one id list) per sequence, checked before any sequence grows.
    unchanged(ValueError, a.append_slots_batch, ["a", "b"], [1], match="num_tokens")
    unchanged(ValueError, a.append_slots_batch, ["a", "b"], [1, 1], [[1]], match="token_ids")
    unchanged(ValueError, a.append_slots_batch, ["a", "b"], [1, 1], [[1], [2.5]], match=r"token_ids\[1\]")
    unchanged(ValueError, a.append_slots_batch, ["a", "b"], [1, 2.0], match=r"num_tokens\[1\]")
    unchanged(ValueError, a.pages_needed, ["a", "b"], [1], match="num_tokens")
    unchanged(ValueError, a.pages_needed, ["a"], [-1], match=r"num_tokens\[0\]")
    unchanged(ValueError, a.add_sequence, "new", [1, 2.0], match="prompt_token_ids")

    # 2 free pages; b appending 5 needs a copy of the shared partial page + 2 new pages
    assert a.num_free_pages == 2 and not a.can_append("b", 5) and a.can_append("b", 3)
    unchanged(OutOfPages, a.append_slots, "b", 5)
    unchanged(MemoryError, a.append_slots, "a", 6)
    a.append_slots("b", 3)  # copy + 1 page: pool now empty, b's pages all full
    assert a.num_free_pages == 0 and a.can_append("a", 1) and not a.can_append("b", 1)
    a.fork("a", "c")
    before = snapshot(a)
    unchanged(OutOfPages, a.append_slots, "c", 1)  # shared partial page, no page for the copy
    unchanged(OutOfPages, a.append_slots, "a", 1)
    unchanged(OutOfPages, a.append_slots, "b", 1)  # needs a new page
    assert a.append_slots("c", 0).shape == (0,)  # nothing to write: no copy needed

    a.free("c")
    with pytest.raises(KeyError, match="'c'"):  # double free
        a.free("c")


# --------------------------------------------------------------------------------------------
# stateful test
# --------------------------------------------------------------------------------------------
NUM_PAGES = 12
VOCAB = 2  # tiny vocabulary: prompts share prefixes all the time


class AllocatorMachine(RuleBasedStateMachine):
    """Random add / append / fork / free / pop_copies against a model of what each sequence holds.

    Model: the token values each live sequence holds, the copies that must be owed, and a
    simulated KV cache `kv` (one value per slot). Writes are queued like a real step: the popped
    copies are applied first, then the slot writes. Fork and free happen between steps.
    With a sliding window (the subclass below), also which leading pages each sequence has dropped:
    those read -1, their tokens are no longer checked, everything else is.
    """

    @initialize(page_size=st.sampled_from([2, 3, 1]))
    def setup(self, page_size):
        self.start(page_size, -1)

    def start(self, page_size, window):
        self.ps, self.window = page_size, window
        self.a = PageAllocator(NUM_PAGES, page_size, window_left=window)
        self.tokens = {}  # seq id -> token values it holds
        self.horizon = {}  # seq id -> its length before its last append of >= 1 token: the window drops follow it
        self.kv = np.full(NUM_PAGES * page_size, -1, dtype=np.int64)
        self.pending = []  # (slots, values) writes of the current step
        self.copies = []  # copies the allocator owes, in order
        self.next_id = 0
        self.next_unknown = 1000  # values of tokens appended without ids (never in the vocab)
        self.add(None)

    # -- helpers ------------------------------------------------------------------------------
    def dropped(self, sid):
        """Leading pages the sequence must have dropped: page i once (i + 1) * ps <= horizon - window."""
        return 0 if self.window < 0 else max(0, (self.horizon[sid] - self.window) // self.ps)

    def written(self):
        """Pages the current step owes writes to (their slots were handed out since the last flush)."""
        return {s // self.ps for slots, _ in self.pending for s in slots.tolist()}

    def held(self, sid):
        return [p for p in self.a.pages_of(sid) if p >= 0]

    def refs(self):
        return Counter(p for s in self.tokens for p in self.held(s))

    def expect(self, sid, n, refs):
        """The model of one append: (fresh pages, copy-on-write, pages dropped after it, pages it drops now),
        updating ``refs`` as the append changes the holders."""
        ps = self.ps
        pages0, len0 = self.a.pages_of(sid), self.a.seq_len(sid)
        cow = n > 0 and len0 % ps != 0 and refs[pages0[-1]] > 1
        if cow:
            refs[pages0[-1]] -= 1
        d0 = self.dropped(sid)
        cut = max(d0, (len0 - self.window) // ps) if self.window >= 0 and n > 0 else d0
        gone = pages0[d0:cut]
        assert -1 not in gone
        for p in gone:
            refs[p] -= 1
        return ceil_div(len0 + n, ps) - len(pages0) + cow, cow, cut, gone

    def do_append(self, sid, n, ids):
        a = self.a
        pages0, len0, free0, refs = a.pages_of(sid), a.seq_len(sid), a.num_free_pages, self.refs()
        fresh, cow, cut, gone = self.expect(sid, n, refs)
        # Pages the window drop returns serve this append, unless this step still owes them writes.
        need = fresh - sum(refs[p] == 0 and p not in self.written() for p in gone)
        assert a.can_append(sid, n) == (need <= free0)
        assert a.pages_needed([sid], [n]) == need
        before = snapshot(a)
        try:
            slots = a.append_slots(sid, n, ids)
        except OutOfPages:
            event("append: OutOfPages")
            assert need > free0
            assert snapshot(a) == before
            return False
        assert need <= free0 and a.num_free_pages == free0 - need
        self.check_append(sid, n, ids, slots, pages0, len0, cow, cut)
        return True

    def check_append(self, sid, n, ids, slots, pages0, len0, cow, cut):
        """An append went through: the sequence's pages, its slots, and the model's owed copies and writes."""
        a, ps = self.a, self.ps
        pages = a.pages_of(sid)
        assert len(pages) == ceil_div(len0 + n, ps)
        if cut > self.dropped(sid):
            event("append: window drop")
        assert pages[:cut] == [-1] * cut  # dropped behind the window
        keep = len(pages0) - cow
        assert pages[cut:keep] == pages0[cut:keep]  # nothing else moves
        if cow:
            event("append: copy-on-write")
            assert pages[keep] != pages0[-1]
            self.copies.append((pages0[-1], pages[keep]))
        assert slots.dtype == np.int64 and slots.shape == (n,)
        assert slots.tolist() == expected_slots(pages, len0, n, ps)
        refs = self.refs()
        assert all(refs[s // ps] == 1 for s in slots.tolist())  # never write into a shared page
        if ids is None:
            values = list(range(self.next_unknown, self.next_unknown + n))
            self.next_unknown += n
        else:
            values = list(ids)
        self.pending.append((slots, values))
        self.tokens[sid] += values
        if n > 0:
            self.horizon[sid] = len0

    def flush(self):
        """End of a step: do the owed copies, then the slot writes, then read everything back."""
        src, dst = self.a.pop_copies()
        assert src.dtype == dst.dtype == np.int32 and src.shape == dst.shape
        assert list(zip(src.tolist(), dst.tolist())) == self.copies
        ps = self.ps
        for s, d in self.copies:
            self.kv[d * ps : (d + 1) * ps] = self.kv[s * ps : (s + 1) * ps]
        for slots, values in self.pending:
            self.kv[slots] = values
        self.copies, self.pending = [], []
        assert len(self.a.pop_copies()[0]) == 0
        for sid, toks in self.tokens.items():
            pages = self.a.pages_of(sid)
            pos = [p for p in range(len(toks)) if pages[p // ps] >= 0]  # not behind the window
            read = self.kv[[pages[p // ps] * ps + p % ps for p in pos]] if pos else []
            assert list(read) == [toks[p] for p in pos], (sid, pages, toks)

    # -- rules --------------------------------------------------------------------------------
    @rule(prompt=st.none() | st.lists(st.integers(0, VOCAB - 1), max_size=10))
    def add(self, prompt):
        sid, self.next_id = self.next_id, self.next_id + 1
        free0 = self.a.num_free_pages
        cached = self.a.add_sequence(sid, prompt)
        assert self.a.seq_len(sid) == cached
        if prompt is None:
            assert cached == 0
        else:
            assert cached % self.ps == 0 and 0 <= cached <= max(0, len(prompt) - 1)
        if cached:
            event("add: prefix hit")
        # the content of the reused pages is checked against prompt[:cached] at the next flush
        self.tokens[sid] = list(prompt[:cached]) if prompt else []
        self.horizon[sid] = 0  # a prefix hit drops nothing until the first append
        held = set(self.refs())
        assert self.a.num_free_pages <= free0
        assert self.a.num_free_pages == NUM_PAGES - len(held) - len(self.a._deferred)
        if prompt and cached < len(prompt):
            self.do_append(sid, len(prompt) - cached, prompt[cached:])

    @rule(prompt=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=10))
    def short_request(self, prompt):
        """A request that runs its prompt and finishes: its full pages stay cached, free."""
        self.add(prompt)
        self.flush()
        sid = self.next_id - 1
        self.a.free(sid)
        del self.tokens[sid]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), n=st.integers(0, 5), with_ids=st.booleans())
    def append(self, data, n, with_ids):
        sid = data.draw(st.sampled_from(sorted(self.tokens)), label="sid")
        ids = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=n, max_size=n)) if with_ids else None
        self.do_append(sid, n, ids)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), with_ids=st.booleans())
    def append_batch(self, data, with_ids):
        """One step's appends at once (append_slots_batch): all or nothing, pages_needed exact."""
        a = self.a
        sids = data.draw(st.lists(st.sampled_from(sorted(self.tokens)), min_size=1, max_size=4, unique=True))
        ns = data.draw(st.lists(st.integers(0, 4), min_size=len(sids), max_size=len(sids)), label="ns")
        ids = [data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=n, max_size=n)) for n in ns] if with_ids \
            else None
        free0, refs = a.num_free_pages, self.refs()
        state0 = [(a.pages_of(s), a.seq_len(s)) for s in sids]
        plans = [self.expect(s, n, refs) for s, n in zip(sids, ns)]
        gone = {p for plan in plans for p in plan[3]}  # a page two of them drop is returned once, if at all
        need = sum(plan[0] for plan in plans) - sum(refs[p] == 0 and p not in self.written() for p in gone)
        assert a.pages_needed(sids, ns) == need
        before = snapshot(a)
        try:
            slots = a.append_slots_batch(sids, ns, ids)
        except OutOfPages:
            event("append_batch: OutOfPages")
            assert need > free0
            assert snapshot(a) == before
            return
        assert need <= free0 and a.num_free_pages == free0 - need
        assert slots.dtype == np.int64 and slots.shape == (sum(ns),)
        off = 0
        for i, (sid, n) in enumerate(zip(sids, ns)):
            self.check_append(sid, n, None if ids is None else ids[i], slots[off:off + n], *state0[i],
                              plans[i][1], plans[i][2])
            off += n

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def fork(self, data):
        self.flush()  # fork between steps: the parent's slots are written
        parent = data.draw(st.sampled_from(sorted(self.tokens)), label="parent")
        child, self.next_id = self.next_id, self.next_id + 1
        refs0, free0 = self.refs(), self.a.num_free_pages
        self.a.fork(parent, child)
        self.tokens[child] = list(self.tokens[parent])
        self.horizon[child] = self.horizon[parent]
        assert self.a.pages_of(child) == self.a.pages_of(parent)  # dropped entries (-1) included
        assert self.a.num_free_pages == free0
        assert self.refs() == refs0 + Counter(self.held(parent))

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), n=st.integers(1, 3), child_first=st.booleans(), with_ids=st.booleans())
    def fork_then_append(self, data, n, child_first, with_ids):
        """Beam-search pattern: fork, then both sides append (copy-on-write when mid-page)."""
        self.fork(data)
        child = self.next_id - 1
        parent = data.draw(st.sampled_from([s for s in self.tokens if self.tokens[s] == self.tokens[child]]))
        for sid in (child, parent) if child_first else (parent, child):
            ids = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=n, max_size=n)) if with_ids else None
            self.do_append(sid, n, ids)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        self.flush()  # sequences finish between steps
        sid = data.draw(st.sampled_from(sorted(self.tokens)), label="sid")
        self.a.free(sid)
        del self.tokens[sid]
        before = snapshot(self.a)
        with pytest.raises(KeyError):
            self.a.free(sid)
        assert snapshot(self.a) == before

    @rule()
    def pop_copies(self):
        self.flush()

    @rule(n=st.integers(-3, -1))
    def bad_calls(self, n):
        before = snapshot(self.a)
        with pytest.raises(KeyError):
            self.a.append_slots("nope", 1)
        with pytest.raises(KeyError):
            self.a.fork("nope", "child")
        if self.tokens:
            sid = min(self.tokens)
            with pytest.raises(ValueError, match="num_tokens"):
                self.a.append_slots(sid, n)
            with pytest.raises(ValueError, match="token_ids"):
                self.a.append_slots(sid, 2, [0])
            with pytest.raises(ValueError):
                self.a.add_sequence(sid)
            with pytest.raises(ValueError):
                self.a.fork(sid, max(self.tokens))
        assert snapshot(self.a) == before

    # -- invariants ---------------------------------------------------------------------------
    @invariant()
    def pages_accounted_for(self):
        if not hasattr(self, "a"):
            return
        a, ps = self.a, self.ps
        refs = self.refs()
        for sid, toks in self.tokens.items():
            pages, d = a.pages_of(sid), self.dropped(sid)
            assert a.seq_len(sid) == len(toks)
            assert len(pages) == ceil_div(len(toks), ps)
            assert pages[:d] == [-1] * d  # exactly the pages behind the window are dropped
            held = pages[d:]
            assert len(set(held)) == len(held)  # no page twice in one sequence
            assert all(0 <= p < NUM_PAGES for p in held)
            if self.window >= 0:  # bounded: the window plus one append (<= 10 tokens) of pages
                assert len(held) <= ceil_div(self.window + 10, ps) + 1
        # reference counts == live holders; free pool == everything else, each page once
        assert a._ref == [refs[p] for p in range(NUM_PAGES)]
        # (pages nobody holds that the step owes writes to rejoin the pool at the next flush)
        pool = list(a._free) + list(a._cached_free) + list(a._deferred)
        assert len(pool) == len(set(pool)) and set(pool) == set(range(NUM_PAGES)) - set(refs)
        assert set(a._deferred) <= self.written()
        assert a.num_free_pages == NUM_PAGES - len(refs) - len(a._deferred)
        # the prefix cache index is consistent and only names pages, live or cached free
        assert {p: k for k, p in a._key_to_page.items()} == a._page_key
        assert set(a._cached_free) <= set(a._page_key)
        # block_table rows match pages_of, padded with -1
        ids = sorted(self.tokens)
        bt = a.block_table(ids)
        width = max([len(a.pages_of(s)) for s in ids], default=0) or 1
        assert bt.dtype == np.int32 and bt.shape == (len(ids), width)
        for row, sid in zip(bt.tolist(), ids):
            pages = a.pages_of(sid)
            assert row == pages + [-1] * (width - len(pages))
        assert a.seq_lens(ids).tolist() == [len(self.tokens[s]) for s in ids]


AllocatorMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestAllocatorMachine = AllocatorMachine.TestCase


class WindowedAllocatorMachine(AllocatorMachine):
    """The same machine with a sliding window: pages dropped behind it, forks and prefix hits across drops."""

    @initialize(page_size=st.sampled_from([2, 3, 1]), window=st.sampled_from([0, 1, 2, 5]))
    def setup(self, page_size, window):
        self.start(page_size, window)


WindowedAllocatorMachine.TestCase.settings = AllocatorMachine.TestCase.settings
TestWindowedAllocatorMachine = WindowedAllocatorMachine.TestCase


# --------------------------------------------------------------------------------------------
# sliding window: pages wholly behind every future query's window are dropped
# --------------------------------------------------------------------------------------------
def pool(a):
    """The free pool as a set, checked to hold each page once and exactly the pages nobody references."""
    free = list(a._free) + list(a._cached_free)
    assert len(free) == len(set(free)) == a.num_free_pages
    assert set(free) == {p for p in range(a.num_pages) if a._ref[p] == 0}
    return set(free)


def step(a, seq_id, n, token_ids=None):
    """One engine step of one sequence: its append, then the step's copies popped (its writes issued)."""
    slots = a.append_slots(seq_id, n, token_ids)
    a.pop_copies()
    return slots


def step_batch(a, seq_ids, ns):
    """One engine step of a batch: the batch's appends, then its copies popped."""
    slots = a.append_slots_batch(seq_ids, ns)
    a.pop_copies()
    return slots


def test_window_left_is_validated():
    for bad in (-2, 1.5, True, "3", None):
        with pytest.raises(ValueError, match="window_left"):
            PageAllocator(8, 4, window_left=bad)
    assert PageAllocator(8, 4).window_left == -1
    assert PageAllocator(8, 4, window_left=np.int64(0)).window_left == 0


def test_window_drops_exactly_the_pages_behind_it():
    ps, w = 5, 12
    a = PageAllocator(num_pages=40, page_size=ps, window_left=w)
    a.add_sequence("s")
    step(a, "s", 23)  # prefill from 0: its first query sees key 0, nothing is dropped
    pages = a.pages_of("s")
    assert len(pages) == 5 and -1 not in pages and a.num_free_pages == 35
    # the next query is at 23 and sees keys >= 11: pages 0 and 1 (tokens 0..9) are behind it, page 2 is not
    slot = a.append_slots("s", 1)
    assert slot.tolist() == [pages[4] * ps + 3]
    assert a.pages_of("s") == [-1, -1] + pages[2:]
    assert a.block_table(["s"]).tolist() == [[-1, -1] + pages[2:]]
    assert a.seq_len("s") == 24 and a.seq_lens(["s"]).tolist() == [24]  # every token still counts
    assert pool(a) == set(range(40)) - set(pages[2:])
    step(a, "s", 1)  # query at 24 sees >= 12: page 2 (10..14) still needed
    assert a.pages_of("s")[:3] == [-1, -1, pages[2]]
    step(a, "s", 3)  # queries from 25 see >= 13: still needs key 13 of page 2
    assert a.pages_of("s")[:3] == [-1, -1, pages[2]]
    step(a, "s", 0)  # appending nothing drops nothing (there is no query)
    assert a.pages_of("s")[:3] == [-1, -1, pages[2]]
    step(a, "s", 1)  # query at 28 sees >= 16: page 2 goes, page 3 (15..19) stays
    assert a.pages_of("s")[:4] == [-1, -1, -1, pages[3]]
    assert pages[2] in pool(a)
    # a chunk: its earliest query (at 29) decides, not its last
    step(a, "s", 20)
    assert a.pages_of("s")[:4] == [-1, -1, -1, pages[3]] and len(a.pages_of("s")) == 10
    a.free("s")
    assert pool(a) == set(range(40)) and a.num_free_pages == 40


def test_window_zero_drops_every_full_page():
    a = PageAllocator(num_pages=3, page_size=5, window_left=0)  # a query sees only its own key
    a.add_sequence("s")
    for i in range(97):
        step(a, "s", 1)
        assert len([p for p in a.pages_of("s") if p >= 0]) == 1  # one page, ever
    assert a.seq_len("s") == 97 and len(a.pages_of("s")) == 20 and a.num_free_pages == 2


def test_long_windowed_generation_holds_bounded_pages():
    """vLLM's point: a windowed sequence of any length holds ceil((window + 1) / page) + 1 pages at most."""
    ps, w, num_pages = 5, 12, 9
    a = PageAllocator(num_pages=num_pages, page_size=ps, window_left=w)
    bound = -(-(w + 1) // ps) + 1  # 4: the window's keys may straddle one extra page
    seqs = ["x", "y"]
    for s in seqs:
        a.add_sequence(s)
        step(a, s, 17)  # a prompt of 17: 4 pages
    assert a.num_free_pages == 1
    for k in range(300):  # 600 tokens through 9 pages
        assert a.pages_needed(seqs, [1, 1]) <= a.num_free_pages
        slots = step_batch(a, seqs, [1, 1])
        held = [[p for p in a.pages_of(s) if p >= 0] for s in seqs]
        assert max(map(len, held)) <= bound, (k, held)
        assert a.num_free_pages == num_pages - sum(map(len, held))
        for s, slot, h in zip(seqs, slots.tolist(), held):
            assert slot // ps == h[-1]
            # exactly the pages the next query (at seq_len) can see are held
            first = (a.seq_len(s) - 1 - w) // ps
            assert a.pages_of(s)[:max(first, 0)] == [-1] * max(first, 0)
    assert a.seq_lens(seqs).tolist() == [317, 317]
    for s in seqs:
        a.free(s)
    assert pool(a) == set(range(num_pages))


def test_window_drops_are_atomic_and_count_for_the_same_step():
    ps, w = 5, 12
    a = PageAllocator(num_pages=4, page_size=ps, window_left=w)
    a.add_sequence("a")
    step(a, "a", 20)  # 4 full pages, pool empty
    assert a.num_free_pages == 0
    before = snapshot(a)
    # 11 tokens at 20: the drop (page 0) returns 1, the append needs 3: refused, page 0 not dropped either
    assert a.pages_needed(["a"], [11]) == 2 and not a.can_append("a", 11)
    with pytest.raises(OutOfPages):
        step(a, "a", 11)
    assert snapshot(a) == before
    with pytest.raises(OutOfPages):
        a.append_slots_batch(["a"], [11])
    assert snapshot(a) == before
    # one token: the page its drop returns is the one it gets
    page0 = a.pages_of("a")[0]
    assert a.pages_needed(["a"], [1]) == 0 and a.can_append("a", 1)
    assert a.append_slots("a", 1).tolist() == [page0 * ps]
    assert a.pages_of("a") == [-1] + a.pages_of("a")[1:4] + [page0]

    # a batch: b's drop pays for c's page, whatever their order; a failing member changes nothing
    a = PageAllocator(num_pages=7, page_size=ps, window_left=w)
    a.add_sequence("c")
    step(a, "c", 10)  # 2 full pages
    a.add_sequence("b")
    step(a, "b", 25)  # 5 full pages: pool empty
    assert a.pages_needed(["c", "b"], [1, 1]) == 0  # c takes 1, b takes 1, b's drop returns 2 (pages 0, 1)
    before = snapshot(a)
    with pytest.raises(OutOfPages):
        a.append_slots_batch(["c", "b"], [1, 7])  # b needs 2 fresh: 3 > 2 returned
    assert snapshot(a) == before
    slots = step_batch(a, ["c", "b"], [1, 1])
    assert a.pages_of("b")[:2] == [-1, -1] and a.num_free_pages == 0
    assert {s // ps for s in slots.tolist()} == {a.pages_of("c")[2], a.pages_of("b")[5]}


def test_window_with_forks():
    ps, w = 5, 12
    a = PageAllocator(num_pages=30, page_size=ps, window_left=w)
    a.add_sequence("p")
    a.append_slots("p", 33)
    a.append_slots("p", 1)  # at 33, sees >= 21: pages 0..3 dropped
    pp = a.pages_of("p")
    assert pp[:4] == [-1] * 4 and -1 not in pp[4:]
    free0 = a.num_free_pages
    a.fork("p", "c")
    assert a.pages_of("c") == pp and a.num_free_pages == free0  # dropped stay dropped in the child
    assert a.block_table(["p", "c"]).tolist() == [pp, pp]
    assert all(a._ref[p] == 2 for p in pp[4:])
    # a page both hold is returned only when both have dropped it
    a.append_slots("c", 3)  # c at 34 sees >= 22: page 4 (20..24) still needed; c copies the shared partial page
    assert a.pop_copies()[0].tolist() == [pp[6]]  # tokens 30..33
    assert a.pages_of("c")[:5] == [-1] * 4 + [pp[4]]
    assert a.pages_needed(["c"], [1]) == 0  # room in its last page, and its drop of page 4 returns nothing: p holds it
    a.append_slots("c", 1)  # c at 37 sees >= 25: page 4 dropped by c only
    assert a.pages_of("c")[4] == -1 and a.pages_of("p")[4] == pp[4]
    assert a._ref[pp[4]] == 1 and pp[4] not in pool(a)
    a.append_slots("p", 3)  # p at 34: its partial page is private now, writes in place
    assert len(a.pop_copies()[0]) == 0
    assert a.pages_needed(["p"], [1]) == -1  # no fresh page, and p's drop of page 4 returns it
    free1 = a.num_free_pages
    a.append_slots("p", 1)  # p at 37: page 4 dropped by its last holder
    assert pp[4] in pool(a) and a.num_free_pages == free1 + 1
    a.fork("c", "g")  # a fork of a fork, past more drops
    assert a.pages_of("g")[:5] == [-1] * 5
    a.free("p")
    a.free("c")
    a.append_slots("g", 40)  # the grandchild goes on alone
    a.free("g")
    assert pool(a) == set(range(30))


def test_window_with_prefix_cache():
    """Pages dropped behind the window keep their prefix-cache keys: a later prompt still reuses them (from the
    LRU, or shared with the dropping sequence's forks); evicted heads end the reuse, and hashes stay consistent."""
    ps, w = 5, 12
    a = PageAllocator(num_pages=12, page_size=ps, window_left=w)
    prompt = list(range(100, 131))  # 31 tokens: 6 full pages + 1
    a.add_sequence("a", prompt)
    step(a, "a", 31, prompt)
    pa = a.pages_of("a")
    for t in range(200, 210):
        step(a, "a", 1, [t])  # drops pages 0..4 into the prefix cache's LRU (keyed, free)
    assert a.pages_of("a")[:5] == [-1] * 5 and set(pa[:5]) <= set(a._cached_free)
    assert a.num_free_pages == 12 - 4  # a (41 tokens) holds pages 5..8
    # a later prompt with the same prefix reuses every cached page: the dropped ones and the one a still holds
    assert a.add_sequence("b", prompt) == 30
    assert a.pages_of("b") == pa[:6] and a._ref[pa[5]] == 2
    step(a, "b", 1, prompt[30:])  # b at 30 sees >= 18: b drops pages 0..2 (back to the LRU)
    assert a.pages_of("b")[:3] == [-1] * 3 and set(pa[:3]) <= set(a._cached_free)
    assert {p: k for k, p in a._key_to_page.items()} == a._page_key
    # a's pages keep being keyed while it runs: a new prompt of a's whole history hits as far as its pages
    # are still cached
    history = prompt + list(range(200, 210))
    assert a.add_sequence("c", history) == 40
    assert a.pages_of("c") == pa[:6] + a.pages_of("a")[6:8]
    a.free("c")
    a.free("b")
    # evict the prefix head: take every page nobody holds, LRU first (never-cached pages go first)
    a.add_sequence("x")
    step(a, "x", a.num_free_pages * ps)
    assert a.num_free_pages == 0
    assert pa[0] not in a._page_key  # evicted: its key is gone with it
    assert a.add_sequence("d", prompt) == 0  # the chain starts at page 0: nothing reusable any more
    assert {p: k for k, p in a._key_to_page.items()} == a._page_key
    a.free("x")
    a.free("a")
    a.free("d")
    assert pool(a) == set(range(12))


def test_window_drop_within_a_step_defers_pages_owed_writes():
    """A second append of a sequence before pop_copies whose window drop frees a page the first one gave slots in:
    the page is not handed out again until pop_copies (as a copy's destination it would receive those stale
    writes after the copy), and does not count as free meanwhile."""
    a = PageAllocator(num_pages=2, page_size=2, window_left=0)
    a.add_sequence("s")
    first = step(a, "s", 1).tolist()[0] // 2  # a step: page `first` holds token 0
    a.append_slots("s", 2)  # tokens 1 (page `first`) and 2 (a new page): both owed writes this step
    a.append_slots("s", 1)  # same step, at 3: the window drops page `first`
    assert a.pages_of("s")[0] == -1 and a._ref[first] == 0
    a.add_sequence("t")
    assert a.num_free_pages == 0 and a.pages_needed(["t"], [1]) == 1 and not a.can_append("t", 1)
    with pytest.raises(OutOfPages):
        a.append_slots("t", 1)
    a.pop_copies()  # the step's writes are issued: the page rejoins the pool
    assert a.num_free_pages == 1 and a.append_slots("t", 1).tolist() == [first * 2]
