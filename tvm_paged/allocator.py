"""Page allocator for the paged KV cache: ref-counted pages, copy-on-write forks, prefix caching.

Host-side bookkeeping only (pure Python + numpy, no tvm/torch). It decides which physical page
of the KV cache holds each token of each sequence; the kernels consume what it produces:

    block_table   int32 [num_seqs, max_pages]  page ids of each sequence, rows padded with -1
    seq_lens      int32 [num_seqs]             tokens held by each sequence
    slot_mapping  int64 [num_tokens]           where each new token's K/V goes: page * page_size + offset
    copies        int32 [num_copies] (src, dst) whole-page copies owed before writing those slots

One step: ``append_slots`` for every running sequence (concatenated: slot_mapping), ``pop_copies``
and copy those pages, write the new K/V at the slots, then attention over ``block_table``.
Fork only sequences whose earlier slots have been written (a copy reads the page as it is then).

Sliding window (``window_left >= 0``, the kernels' meaning: a query at position p sees keys
j >= p - window_left): an append of n >= 1 tokens to a sequence of length L0 first drops the
sequence's pages that lie wholly behind its earliest new query's window, i.e. page i once
(i + 1) * page_size <= L0 - window_left. No query of this step or any later one (its positions are
>= L0) can see them, and the kernels do not read them. Their entries read -1 in ``block_table`` and
``pages_of`` (entry i stays page i of the sequence); ``seq_len`` still counts every token. A dropped
page loses this sequence's reference only: it returns to the pool (or to the prefix cache's LRU,
still reusable by later prompts) once nobody holds it. Pages so returned count as free for the same
append (and batch): ``pages_needed`` is the net change of the free pool, and may be negative.

A page given slots since the last ``pop_copies`` has writes owed to it that run after the step's copies.
When the window drops such a page from its last holder within the same step (a second append of that
sequence before ``pop_copies``), it returns to the pool only at the next ``pop_copies``: handed out again now,
as a fresh page or a copy's destination, it would receive those stale writes on top of its new contents. It
does not count as free until then. (``free`` releases at once: free a sequence between steps.)
"""
from __future__ import annotations

import operator
from collections import OrderedDict, deque
from typing import Hashable, Iterable, Sequence

import numpy as np

from .config import check_int


def _token_list(ids, name: str) -> list[int]:
    """Token ids as a list of Python ints (they are hashed into the prefix cache): ints only, no floats."""
    try:
        return list(map(operator.index, ids))
    except TypeError:
        raise ValueError(f"{name}: token ids must be ints, got {type(ids).__name__} holding "
                         f"{sorted({type(t).__name__ for t in ids})}") from None


class OutOfPages(MemoryError):
    """Not enough free pages for the request; the allocator was left unchanged."""


class _Seq:
    __slots__ = ("pages", "row", "length", "last_hash", "partial", "dropped")

    def __init__(self, pages, row, length, last_hash, partial, dropped=0):
        self.pages = pages          # list[int]: page ids, ceil(length / page_size) of them (-1: dropped)
        self.row = row              # this sequence's row in PageAllocator._table
        self.length = length        # tokens held
        self.last_hash = last_hash  # chained hash of the last full page (None before the first one)
        self.partial = partial      # token ids in the not-yet-full last page; None once the chain broke
        self.dropped = dropped      # leading pages dropped behind the sliding window (pages[:dropped] == -1)


class PageAllocator:
    """Hands out pages of ``page_size`` token slots from a pool of ``num_pages`` pages.

    A page held by several sequences (after ``fork`` or a prefix-cache hit) is ref-counted and
    never written in place: the first append into a shared, partly filled page moves the appending
    sequence to a fresh copy (see ``pop_copies``). Full pages whose token ids are known are keyed
    by a chained hash so a later prompt with the same prefix can reuse them (``add_sequence``).

    ``window_left`` (-1: none): the sliding window of the attention these pages serve; pages wholly
    behind it are dropped as sequences grow (see the module docstring), so a long windowed generation
    holds about ``(window_left + tokens per step) / page_size + 2`` pages.
    """

    def __init__(self, num_pages: int, page_size: int, *, window_left: int = -1):
        num_pages, page_size = check_int(num_pages, "num_pages"), check_int(page_size, "page_size")
        if (isinstance(window_left, bool) or not isinstance(window_left, (int, np.integer))
                or window_left < -1):
            raise ValueError(f"window_left: expected an int >= -1 (-1: no window), got {window_left!r}")
        self.num_pages = int(num_pages)
        self.page_size = int(page_size)
        self.window_left = int(window_left)
        self._ref = [0] * self.num_pages          # live sequences holding each page
        self._free = deque(range(self.num_pages))  # free pages not in the prefix cache
        self._cached_free = OrderedDict()          # free pages still in the prefix cache, LRU first
        self._key_to_page = {}                     # (prev hash, page token ids) -> page
        self._page_key = {}                        # inverse, for eviction
        self._seqs = {}                            # seq_id -> _Seq
        self._copies = []                          # (src, dst) page copies not yet popped
        self._written = set()                      # pages given slots since the last pop_copies
        self._deferred = []                        # of those, pages nobody holds: free at pop_copies
        # Mirror of every live sequence's pages as int32 rows padded with -1, so block_table is one
        # numpy gather instead of converting Python lists each step. Grows by doubling.
        self._table = np.full((8, 8), -1, dtype=np.int32)
        self._free_rows = []
        self._rows_used = 0

    # -- queries -------------------------------------------------------------------------------
    def _seq(self, seq_id: Hashable) -> _Seq:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence id {seq_id!r}") from None

    @property
    def num_free_pages(self) -> int:
        """Pages no live sequence holds (never-cached free + cached free)."""
        return len(self._free) + len(self._cached_free)

    def seq_len(self, seq_id: Hashable) -> int:
        return self._seq(seq_id).length

    def pages_of(self, seq_id: Hashable) -> list[int]:
        """Page ids of the sequence, in token order (a copy); -1 for pages dropped behind the window."""
        return list(self._seq(seq_id).pages)

    def seq_lens(self, seq_ids: Iterable[Hashable]) -> np.ndarray:
        """int32 [len(seq_ids)] tokens held by each sequence."""
        return np.array([self._seq(s).length for s in seq_ids], dtype=np.int32)

    def block_table(self, seq_ids: Iterable[Hashable]) -> np.ndarray:
        """int32 [len(seq_ids), max_pages] page ids, rows padded with -1 (max_pages >= 1)."""
        seqs = [self._seq(s) for s in seq_ids]
        max_pages = max([len(s.pages) for s in seqs], default=0) or 1
        return self._table[np.array([s.row for s in seqs], dtype=np.intp), :max_pages]

    def _cut(self, seq: _Seq, n: int) -> int:
        """The number of leading pages of the sequence that are dropped once n more tokens are appended."""
        if self.window_left < 0 or n <= 0:
            return seq.dropped
        return max(seq.dropped, (seq.length - self.window_left) // self.page_size)

    def _needed(self, seq: _Seq, n: int) -> int:
        """Net pages appending n tokens takes from the free pool, as append_slots: fresh pages (a copy-on-write
        copy included) minus the pages the window drop returns to the pool."""
        cow = n > 0 and seq.length % self.page_size != 0 and self._ref[seq.pages[-1]] > 1
        need = -(-(seq.length + n) // self.page_size) - len(seq.pages) + cow
        cut = self._cut(seq, n)
        if cut > seq.dropped:
            need -= sum(self._ref[p] == 1 and p not in self._written for p in seq.pages[seq.dropped : cut])
        return need

    def can_append(self, seq_id: Hashable, num_tokens: int) -> bool:
        """Whether append_slots(seq_id, num_tokens) would get its pages (copy-on-write and window drop included)."""
        seq, n = self._seq(seq_id), check_int(num_tokens, "num_tokens", 0)
        return self._needed(seq, n) <= self.num_free_pages

    # -- page pool and table rows ---------------------------------------------------------------
    def _take_page(self) -> int:
        if self._free:
            page = self._free.popleft()
        else:  # only now evict the least recently used cached page: it may still save a prefill
            page, _ = self._cached_free.popitem(last=False)
            del self._key_to_page[self._page_key.pop(page)]
        self._ref[page] = 1
        return page

    def _release(self, page: int, dropped: bool = False) -> None:
        self._ref[page] -= 1
        if self._ref[page] == 0:
            if dropped and page in self._written:  # this step owes it writes: free once they are issued
                self._deferred.append(page)
            else:
                self._to_pool(page)

    def _to_pool(self, page: int) -> None:
        if page in self._page_key:
            self._cached_free[page] = None  # most recently used end
        else:
            self._free.append(page)

    def _new_seq(self, seq_id: Hashable, pages: list, length: int, last_hash, partial, dropped=0) -> _Seq:
        if self._free_rows:
            row = self._free_rows.pop()
        else:
            row, self._rows_used = self._rows_used, self._rows_used + 1
        seq = self._seqs[seq_id] = _Seq(pages, row, length, last_hash, partial, dropped)
        self._set_row(seq, 0)
        return seq

    def _drop(self, seq: _Seq, cut: int) -> None:
        """Drop the sequence's pages [seq.dropped, cut) (behind its window): -1 in its row, one ref less each."""
        start = seq.dropped
        if cut <= start:
            return
        pages = seq.pages
        gone = pages[start:cut]
        pages[start:cut] = [-1] * (cut - start)
        self._table[seq.row, start:cut] = -1
        seq.dropped = cut
        for page in reversed(gone):  # tail first, as free() does
            self._release(page, dropped=True)

    def _set_row(self, seq: _Seq, start: int) -> None:
        """Copy seq.pages[start:] into its table row, growing the table when needed."""
        rows, cols = self._table.shape
        if seq.row >= rows or len(seq.pages) > cols:
            new_rows = 2 * rows if seq.row >= rows else rows  # rows are handed out one at a time
            new_cols = max(len(seq.pages), 2 * cols) if len(seq.pages) > cols else cols
            grown = np.full((new_rows, new_cols), -1, dtype=np.int32)
            grown[:rows, :cols] = self._table
            self._table = grown
        self._table[seq.row, start : len(seq.pages)] = seq.pages[start:]

    # -- mutations ----------------------------------------------------------------------------
    def add_sequence(self, seq_id: Hashable, prompt_token_ids: Sequence[int] | None = None) -> int:
        """Register a sequence; returns how many prompt tokens are already cached (whole pages).

        The sequence starts at that length, sharing the cached pages. At least one prompt token is
        always left uncached so the caller still runs the model on it (it needs its logits); the
        caller appends the remaining prompt tokens with ``append_slots(..., token_ids=...)``.
        """
        if seq_id in self._seqs:
            raise ValueError(f"sequence id {seq_id!r} already exists")
        pages, last_hash, ps = [], None, self.page_size
        if prompt_token_ids is not None:
            tokens = _token_list(prompt_token_ids, "prompt_token_ids")  # ints only: they are hashed
            for i in range((len(tokens) - 1) // ps):  # full pages, never the last prompt token
                key = (last_hash, tuple(tokens[i * ps : (i + 1) * ps]))
                page = self._key_to_page.get(key)
                if page is None:
                    break
                if self._ref[page] == 0:  # back out of the free pool (or of the pages freed after this step)
                    if page in self._cached_free:
                        del self._cached_free[page]
                    else:
                        self._deferred.remove(page)
                self._ref[page] += 1
                pages.append(page)
                last_hash = hash(key)
        return self._new_seq(seq_id, pages, len(pages) * ps, last_hash, []).length

    def append_slots(self, seq_id: Hashable, num_tokens: int,
                     token_ids: Sequence[int] | None = None) -> np.ndarray:
        """Grow the sequence by num_tokens; returns their slots, int64 [num_tokens].

        slot = page * page_size + offset. Raises OutOfPages (changing nothing) when the free pool
        cannot cover the new pages plus a copy-on-write copy. Without token_ids the prefix-cache
        hash chain of this sequence is broken: none of its later pages can be reused.
        With a window and num_tokens >= 1, first drops the pages wholly behind the window of the
        first new token (position seq_len); the pages that returns to the pool count as free here.
        """
        # Runs once per sequence per decode step: helpers (_seq, _needed) are inlined (-25%).
        try:
            seq = self._seqs[seq_id]
        except KeyError:
            seq = self._seq(seq_id)  # raises the KeyError with a message
        n = check_int(num_tokens, "num_tokens", 0)
        if token_ids is not None:
            if len(token_ids) != n:
                raise ValueError(f"token_ids has {len(token_ids)} ids, num_tokens is {n}")
            if seq.partial is not None:  # they will be hashed: ints only, checked before any change
                token_ids = _token_list(token_ids, "token_ids")
        ps, pages, old_len = self.page_size, seq.pages, seq.length
        cow = n > 0 and old_len % ps != 0 and self._ref[pages[-1]] > 1
        need = -(-(old_len + n) // ps) - len(pages) + cow
        available = len(self._free) + len(self._cached_free)
        cut = seq.dropped
        if self.window_left >= 0 and n > 0:
            cut = max(cut, (old_len - self.window_left) // ps)
            if cut > seq.dropped:  # pages this drop gives back serve this append too
                available += sum(self._ref[p] == 1 and p not in self._written for p in pages[seq.dropped : cut])
        if need > available:  # check before mutating anything
            raise OutOfPages(f"sequence {seq_id!r} needs {need} pages, {available} free (window drop included)")
        if cut > seq.dropped:
            self._drop(seq, cut)
        if need:
            first_new = len(pages)
            if cow:  # the last page is shared and partly filled: write into a private copy
                old, first_new = pages[-1], first_new - 1
                pages[-1] = self._take_page()
                self._ref[old] -= 1  # still >= 1: another sequence holds it
                self._copies.append((old, pages[-1]))
            for _ in range(need - cow):
                pages.append(self._take_page())
            self._set_row(seq, first_new)
        seq.length = old_len + n
        if token_ids is None:
            if n > 0:
                seq.partial = None
        elif seq.partial is not None:
            if len(seq.partial) + n < ps:  # no page fills up (the decode case): just remember the ids
                seq.partial.extend(token_ids)
            else:
                self._hash_full_pages(seq, token_ids, old_len // ps)
        first = old_len // ps
        if self.window_left >= 0 and n:  # only window drops can free a page this step writes to
            self._written.update(pages[first:])
        if n == 1:  # decode fast path: numpy fancy indexing costs more than it saves here
            return np.array([pages[first] * ps + old_len % ps], dtype=np.int64)
        pos = np.arange(old_len, old_len + n, dtype=np.int64)
        return np.asarray(pages[first:], dtype=np.int64)[pos // ps - first] * ps + pos % ps

    def pages_needed(self, seq_ids: Sequence[Hashable], num_tokens: Sequence[int]) -> int:
        """Net pages that appending num_tokens[i] to seq_ids[i] (distinct), in order, would take from the free
        pool: new pages plus copy-on-write copies (a page shared only inside the batch is copied by all its
        holders but the last), minus, with a window, the pages the batch's window drops return to the pool (a
        page all of whose holders drop it in this batch included). Negative when the drops free more than the
        batch takes. Changes nothing."""
        seq_ids, num_tokens, _ = self._check_batch(seq_ids, num_tokens)
        return self._pages_needed([self._seq(s) for s in seq_ids], num_tokens)

    def _check_batch(self, seq_ids, num_tokens, token_ids=None) -> tuple:
        """(seq_ids, num_tokens as ints, token_ids as lists of ints or None) of a batch call, checked: one count
        (and one id list, when given) per sequence, counts >= 0, each id list as long as its count."""
        seq_ids, num_tokens = list(seq_ids), list(num_tokens)
        if len(num_tokens) != len(seq_ids):
            raise ValueError(f"num_tokens: {len(num_tokens)} counts for {len(seq_ids)} seq_ids")
        num_tokens = [check_int(n, f"num_tokens[{i}]", 0) for i, n in enumerate(num_tokens)]
        if token_ids is not None:
            token_ids = list(token_ids)
            if len(token_ids) != len(seq_ids):
                raise ValueError(f"token_ids: {len(token_ids)} lists for {len(seq_ids)} seq_ids")
            token_ids = [None if ids is None else _token_list(ids, f"token_ids[{i}]")
                         for i, ids in enumerate(token_ids)]
            for i, (ids, n) in enumerate(zip(token_ids, num_tokens)):
                if ids is not None and len(ids) != n:
                    raise ValueError(f"token_ids[{i}] has {len(ids)} ids, num_tokens is {n}")
        return seq_ids, num_tokens, token_ids

    def _pages_needed(self, seqs: list, num_tokens: list[int]) -> int:
        ps, ref, window = self.page_size, self._ref, self.window_left
        need, leaving, drops = 0, {}, {}
        for seq, n in zip(seqs, num_tokens):
            cow = 0
            if n > 0 and seq.length % ps:
                last = seq.pages[-1]
                if ref[last] - leaving.get(last, 0) > 1:
                    cow, leaving[last] = 1, leaving.get(last, 0) + 1
            need += -(-(seq.length + n) // ps) - len(seq.pages) + cow
            if window >= 0 and n > 0:
                for page in seq.pages[seq.dropped : max(seq.dropped, (seq.length - window) // ps)]:
                    drops[page] = drops.get(page, 0) + 1
        return need - sum(ref[p] == d and p not in self._written for p, d in drops.items())

    def append_slots_batch(self, seq_ids: Sequence[Hashable], num_tokens: Sequence[int],
                           token_ids: Sequence[Sequence[int] | None] | None = None) -> np.ndarray:
        """``append_slots`` for several distinct sequences, all or nothing: their slots concatenated, int64
        [sum(num_tokens)]. Raises (changing nothing) OutOfPages when ``pages_needed`` exceeds the free pool, and
        what append_slots raises for bad arguments."""
        ps, ref = self.page_size, self._ref
        seq_ids, num_tokens, token_ids = self._check_batch(seq_ids, num_tokens, token_ids)
        seqs = [self._seq(s) for s in seq_ids]
        if len(set(map(id, seqs))) != len(seqs):
            raise ValueError("seq_ids: a sequence appears twice")
        need = self._pages_needed(seqs, num_tokens)
        if need > len(self._free) + len(self._cached_free):
            raise OutOfPages(f"the batch needs {need} pages, {self.num_free_pages} free")
        if self.window_left >= 0:  # every drop first: the pages they return serve the whole batch
            for seq, n in zip(seqs, num_tokens):
                self._drop(seq, self._cut(seq, n))
        out = []
        for i, (sid, seq, n) in enumerate(zip(seq_ids, seqs, num_tokens)):
            ids = None if token_ids is None else token_ids[i]
            old = seq.length
            if n == 1 and old % ps and ref[seq.pages[-1]] == 1:  # decode into a private page: inline
                seq.length = old + 1
                if ids is None:
                    seq.partial = None
                elif seq.partial is not None:
                    if len(seq.partial) + 1 < ps:
                        seq.partial.append(ids[0])
                    else:
                        self._hash_full_pages(seq, ids, old // ps)
                out.append(seq.pages[-1] * ps + old % ps)
                if self.window_left >= 0:
                    self._written.add(seq.pages[-1])
            else:
                out.extend(self.append_slots(sid, n, ids).tolist())
        return np.array(out, dtype=np.int64)

    def _hash_full_pages(self, seq: _Seq, token_ids: list[int], page_idx: int) -> None:
        """Feed token ids into the sequence's partial page; key every page that fills up."""
        ps, i = self.page_size, 0
        while i < len(token_ids):
            take = ps - len(seq.partial)
            seq.partial.extend(token_ids[i : i + take])
            i += take
            if len(seq.partial) == ps:
                key = (seq.last_hash, tuple(seq.partial))
                if key not in self._key_to_page:  # first copy wins; a duplicate page stays uncached
                    self._key_to_page[key] = seq.pages[page_idx]
                    self._page_key[seq.pages[page_idx]] = key
                seq.last_hash, seq.partial, page_idx = hash(key), [], page_idx + 1

    def pop_copies(self) -> tuple[np.ndarray, np.ndarray]:
        """(src, dst) int32 [num_copies] page copies to do, in order, before writing new slots."""
        copies, self._copies = self._copies, []
        # The step's writes are done once the caller has made these copies and written its slots.
        deferred, self._deferred, self._written = self._deferred, [], set()
        for page in deferred:
            self._to_pool(page)
        src = np.array([s for s, _ in copies], dtype=np.int32)
        return src, np.array([d for _, d in copies], dtype=np.int32)

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """The child shares every page the parent holds (no copy until one of them writes); pages the parent
        dropped behind the window stay dropped (-1) in the child."""
        parent = self._seq(parent_id)
        if child_id in self._seqs:
            raise ValueError(f"sequence id {child_id!r} already exists")
        for page in parent.pages[parent.dropped:]:
            self._ref[page] += 1
        partial = None if parent.partial is None else list(parent.partial)
        self._new_seq(child_id, list(parent.pages), parent.length, parent.last_hash, partial, parent.dropped)

    def free(self, seq_id: Hashable) -> None:
        """Drop the sequence; pages nobody else holds go back to the pool (keyed ones stay cached)."""
        seq = self._seq(seq_id)
        del self._seqs[seq_id]
        self._table[seq.row, : len(seq.pages)] = -1
        self._free_rows.append(seq.row)
        # Tail first, so LRU eviction drops a prefix's tail before its head (a head alone still hits).
        for page in reversed(seq.pages[seq.dropped:]):
            self._release(page)
