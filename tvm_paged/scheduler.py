"""Continuous batching over a :class:`~tvm_paged.cache.PagedKVCache` (vLLM's policy, small).

Each step takes every running decode (one token each), then chunks of running prefills, then admits waiting
sequences, all under a token budget (``max_tokens_per_step``: long prompts are prefilled in chunks, each chunk
attending to what is already cached). An admitted sequence starts from whatever prefix the prefix cache holds.
When the step does not fit in the pool, the most recently admitted running sequence is preempted: its pages are
freed and it goes back to the front of the queue, to be recomputed (prompt and generated tokens, again helped by
the prefix cache) when pages are free. Requests are never failed for lack of pages.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

import torch

from .cache import OutOfPages, PagedKVCache, Step


@dataclass(eq=False)
class Sequence:
    """One sample of a request. ``tokens``: prompt then generated ids; ``num_computed``: how many of them have
    their K/V in the cache (the rest are fed in the next steps). ``request`` is anything with ``prompt`` (token
    ids), ``max_new_tokens`` and ``n``; ``stopped`` is set when the sequence ends before ``max_new_tokens`` (an
    end-of-sequence token or a stop string)."""

    seq_id: str
    request: object
    tokens: list
    generator: torch.Generator
    num_computed: int = 0
    needs_fork: bool = False        # the request's first sequence forks its siblings once the prompt is done
    cached_at_admission: int = 0     # prefix-cache tokens found when last admitted
    preempted: int = 0
    events: set = field(default_factory=set)  # what this sequence's next step exercises, for the logits checks
    stopped: bool = False

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.num_computed

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - len(self.request.prompt)

    @property
    def finished(self) -> bool:
        return self.stopped or self.num_generated >= self.request.max_new_tokens


class Scheduler:
    def __init__(self, cache: PagedKVCache, *, max_batch: int, max_tokens_per_step: int):
        self.cache = cache
        self.max_batch, self.max_tokens = max_batch, max_tokens_per_step
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last one is preempted first
        self.counters = Counter()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence that already holds pages (a fork)."""
        self.running.append(seq)

    def finish(self, seq: Sequence) -> None:
        self.cache.free(seq.seq_id)
        self.running.remove(seq)

    # -- one step ---------------------------------------------------------------------------------
    def next_step(self) -> tuple[Step, list[tuple[Sequence, int]]] | None:
        """Pick the batch and reserve its pages, preempting as needed. None when nothing is runnable."""
        admitted: list[Sequence] = []
        batch = self._schedule(admitted, admit=True)
        while batch:
            try:
                step = self.cache.begin_step([s.seq_id for s, _ in batch], [n for _, n in batch],
                                             token_ids=[s.tokens[s.num_computed:s.num_computed + n] for s, n in batch])
                for seq in admitted:  # the ones that stayed: counted once they run
                    if seq in self.running:
                        self._count_admission(seq, seq.cached_at_admission)
                return step, batch
            except OutOfPages:
                victim = self.running[-1]
                if len(self.running) == 1:
                    raise RuntimeError(f"{victim.seq_id}: a pool of {self.cache.num_pages} pages cannot hold "
                                       "one sequence's step") from None
                self._evict(victim, preempt=victim not in admitted)  # one admitted just now is only put back
                batch = [(s, n) for s, n in batch if s is not victim]
                if not batch:  # no admissions after a failure: they would only be evicted again
                    batch = self._schedule(admitted, admit=False)
        return None

    def _evict(self, seq: Sequence, *, preempt: bool) -> None:
        self.cache.free(seq.seq_id)
        self.running.remove(seq)
        if preempt:
            self.counters["preemptions"] += 1
            self.counters["preempted_tokens"] += seq.num_computed
            seq.preempted += 1
            seq.events.add("recompute")
        seq.num_computed = 0
        self.waiting.appendleft(seq)

    def _schedule(self, admitted: list, *, admit: bool) -> list[tuple[Sequence, int]]:
        budget, batch = self.max_tokens, []
        for s in self.running:  # decodes first: they are what users wait for
            if s.pending == 1:
                batch.append((s, 1))
                budget -= 1
        for s in self.running:  # then chunks of prompts already under way
            if s.pending > 1 and budget > 0:
                n = min(s.pending, budget)
                batch.append((s, n))
                budget -= n
        ps = self.cache.page_size
        reserved = self.cache.pages_needed([s.seq_id for s, _ in batch], [n for _, n in batch])
        while admit and self.waiting and budget > 0 and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            want = -(-min(seq.pending, budget) // ps) + 1  # its first chunk, one page of headroom
            if (self.running or batch) and self.cache.num_free_pages - reserved < want:
                break  # (alone, a sequence is always admitted: then its step fits the empty pool)
            self.waiting.popleft()
            cached = self.cache.add_sequence(seq.seq_id, seq.tokens)
            seq.num_computed = seq.cached_at_admission = cached
            if cached:
                seq.events.add("prefix_hit")
            n = min(seq.pending, budget)
            batch.append((seq, n))
            budget -= n
            reserved += -(-n // ps) + 1
            self.running.append(seq)
            admitted.append(seq)
        return batch

    def _count_admission(self, seq: Sequence, cached: int) -> None:
        c = self.counters
        if seq.preempted:
            c["readmissions"] += 1
            c["recompute_cached_tokens"] += cached
        else:
            c["admissions"] += 1
            c["prompt_tokens"] += len(seq.tokens)
            c["prefix_cached_tokens"] += cached
            c["prefix_hits"] += cached > 0
