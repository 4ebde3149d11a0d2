"""Generation with continuous batching on the paged KV cache: token-id requests in, finished sequences out.

Every step the scheduler (:mod:`tvm_paged.scheduler`) picks decodes, prefill chunks and admissions under a token
budget, preempting (and later recomputing) when pages run out; the cache plans attention once per step and each
layer runs the plan's bound kernels; a request with ``n > 1`` forks its siblings from the first sequence once the
prompt is in the cache (copy-on-write). Each step's time is split into attention kernels (K/V writes included),
the rest of the model (torch matmuls) and Python bookkeeping (scheduling, planning, sampling).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import dataclass

import torch

from . import tvm_compat as tc
from .cache import PagedKVCache
from .models.llama import LlamaModel
from .sampling import SamplingParams, sample, sequence_generator
from .scheduler import Scheduler, Sequence


@dataclass(frozen=True, eq=False)
class GenerationRequest:
    """One prompt to complete: ``prompt`` token ids, its sampling parameters, the new tokens it may take (the
    parameters' ``max_tokens`` capped by the context and the pool) and the ids that end a completion."""

    index: int
    prompt: tuple[int, ...]
    params: SamplingParams
    max_new_tokens: int
    stop_token_ids: frozenset

    @property
    def n(self) -> int:
        return self.params.n


@contextlib.contextmanager
def kernel_threads(num_threads: int | None):
    """Within the block, TVM's CPU pool has ``num_threads`` workers (None: unchanged).

    The model's matmuls run on torch's OpenMP threads, whose workers spin for a while after each operation; a
    TVM kernel started between two of them waits for its own workers to get a core. Measured on 2 cores, SmolLM2
    at batch 16: attention took 200 ms per decode step with 2 TVM workers and 18 ms with 1 (the calling thread),
    while the matmuls took the same time either way."""
    if num_threads is None:
        yield
        return
    before = tc.runtime_num_threads()
    tc.set_runtime_num_threads(num_threads)
    try:
        yield
    finally:
        tc.set_runtime_num_threads(before)


def default_kernel_threads() -> int | None:
    """1 when torch's matmuls use several threads (see :func:`kernel_threads`), else TVM's own pool size."""
    return 1 if torch.get_num_threads() > 1 else None


class Generator:
    """Runs requests to completion on ``model`` over ``cache``. ``decode(ids) -> str`` (the tokenizer's, special
    tokens skipped) is used for stop strings. ``stats`` counts steps, tokens, prefix hits, forks and preemptions;
    ``seconds`` holds the time split of the last :meth:`run`; ``first_token_s[i]`` the seconds from its start to
    request ``i``'s first generated token (time to first token)."""

    def __init__(self, model: LlamaModel, cache: PagedKVCache, decode, *, max_batch: int, max_tokens_per_step: int,
                 num_kernel_threads: int | None = None, num_tokens: int | None = None):
        self.model, self.cache, self.decode = model, cache, decode
        # The tokenizer's vocabulary: ids at or past it are never sampled (a GGUF's embedding may have padding rows
        # past the last token, which the tokenizer could not decode).
        self.num_tokens = num_tokens
        self.num_kernel_threads = num_kernel_threads
        self.max_batch, self.max_tokens_per_step = max_batch, max_tokens_per_step
        self.stats: Counter = Counter()
        self.seconds: Counter = Counter()
        self.first_token_s: dict[int, float] = {}
        self._t_start = 0.0

    def run(self, requests: list[GenerationRequest], on_token=None) -> list[list[Sequence]]:
        """Complete every request; returns, per request, its ``n`` sequences in sample order. ``on_token(count)``
        is called after each step with the tokens it generated (a progress bar)."""
        sched = Scheduler(self.cache, max_batch=self.max_batch, max_tokens_per_step=self.max_tokens_per_step)
        self.stats, self.seconds, self.first_token_s = Counter(), Counter(), {}
        samples: list[list[Sequence]] = []
        for r in requests:
            first = Sequence(f"g{id(self)}.{r.index}.0", r, list(r.prompt), sequence_generator(r.params.seed, 0))
            first.needs_fork = r.n > 1
            samples.append([first])
            sched.add(first)
        threads = self.num_kernel_threads or default_kernel_threads()
        t_start = self._t_start = time.perf_counter()
        try:
            with kernel_threads(threads):
                while sched.waiting or sched.running:
                    generated = self._step(sched, samples)
                    if on_token is not None:
                        on_token(generated)
        finally:  # an interrupted run leaves no sequence holding pages (the prefix cache keeps what it can)
            for seq in list(sched.running):
                sched.finish(seq)
        total = time.perf_counter() - t_start
        self.seconds["total"] = total
        self.seconds["python"] = total - self.seconds["attention"] - self.seconds["model"]
        for key in ("preemptions", "prefix_cached_tokens", "prompt_tokens", "prefix_hits", "admissions"):
            self.stats[key] += sched.counters[key]
        return samples

    def _step(self, sched: Scheduler, samples: list[list[Sequence]]) -> int:
        picked = sched.next_step()
        if picked is None:
            raise RuntimeError("the scheduler found nothing runnable with requests pending")
        step, batch = picked
        self.stats["steps"] += 1
        self.stats["copied_pages"] += step.copied_pages
        tokens = torch.tensor([t for s, n in batch for t in s.tokens[s.num_computed:s.num_computed + n]])
        last_rows = step.cu_seqlens_q[1:].long() - 1
        attention_s = 0.0

        def paged_attention(layer, q, k, v):
            nonlocal attention_s
            t0 = time.perf_counter()
            self.cache.write(layer, step, k, v)
            out = self.cache.attention(layer, step, q)
            attention_s += time.perf_counter() - t0
            return out

        t0 = time.perf_counter()
        logits = self.model.forward(tokens, step.positions, paged_attention, logit_rows=last_rows)
        self.seconds["attention"] += attention_s
        self.seconds["model"] += time.perf_counter() - t0 - attention_s
        generated = 0
        for (s, n), row in zip(batch, logits):
            s.num_computed += n
            self.stats["prefill_tokens" if n > 1 else "decode_tokens"] += n
            if s.pending:
                continue  # mid-prompt chunk (or a recomputed history): its logits are not sampled
            if s.needs_fork:
                s.needs_fork = False
                for i in range(1, s.request.n):
                    child = Sequence(f"{s.seq_id.rsplit('.', 1)[0]}.{i}", s.request, list(s.tokens),
                                     sequence_generator(s.request.params.seed, i))
                    child.num_computed = s.num_computed
                    self.cache.fork(s.seq_id, child.seq_id)
                    self.stats["forks"] += 1
                    samples[s.request.index].append(child)
                    sched.add_running(child)
                    generated += self._append(sched, child, row)
            generated += self._append(sched, s, row)
        return generated

    def _append(self, sched: Scheduler, seq: Sequence, logits: torch.Tensor) -> int:
        """Sample the sequence's next token, check its stop conditions, finish it when done."""
        req = seq.request
        token = sample(logits[: self.num_tokens], req.params, seq.generator)
        seq.tokens.append(token)
        self.first_token_s.setdefault(req.index, time.perf_counter() - self._t_start)
        if token in req.stop_token_ids and not req.params.ignore_eos:
            seq.stopped = True
        elif req.params.stop_strings:
            text = self.decode(seq.tokens[len(req.prompt):])
            seq.stopped = any(stop in text for stop in req.params.stop_strings)
        if seq.finished:
            sched.finish(seq)
            self.stats["finished_sequences"] += 1
        self.stats["generated_tokens"] += 1
        return 1
