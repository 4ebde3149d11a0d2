"""The engine loop: scheduler -> paged model step -> sampling and forks, with the logits checks and the numbers
the summary reports. Checked steps recompute a sequence's whole history with contiguous attention
(:func:`.model.contiguous_logits`) and compare the last position's logits with the paged path's.
"""

from __future__ import annotations

import sys
import time
from collections import Counter

import torch
from tqdm import tqdm

from .. import targets, tuned_knobs
from ..arrays import TORCH_DTYPE_NAMES
from ..cache import PagedKVCache
from ..config import KernelConfig
from ..models import Tokenizer, default_model_path, open_gguf
from ..models.llama import LlamaModel
from ..scheduler import Scheduler, Sequence
from .model import ModelConfig, TinyLlama, contiguous_logits
from .workload import chat_requests, synthetic_requests

# Logits of the float32 paged path against float32 contiguous attention: they differ only by summation order.
LOGITS_ATOL, LOGITS_RTOL = 1e-3, 1e-3
EVENTS = ("prefix_hit", "chunk", "fork_cow", "recompute")  # always checked the first times they happen


class LogitsMismatch(Exception):
    """The paged path's logits differ from contiguous attention's."""


SYNTHETIC_OPTIONS = ("num_layers", "hidden", "num_qo_heads", "num_kv_heads", "head_dim", "intermediate", "vocab",
                     "max_prompt")


def check_args(args) -> None:
    """Raise ValueError naming the first option out of range."""
    for name in ((SYNTHETIC_OPTIONS if args.model == "synthetic" else ()) +
                 ("page_size", "num_pages", "max_batch", "max_tokens_per_step", "requests", "max_new_tokens")):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("check_every", "check_seqs", "parallel_frac", "temperature"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.arrival_rate <= 0:
        raise ValueError(f"--arrival-rate must be > 0, got {args.arrival_rate}")


class Engine:
    def __init__(self, args):
        check_args(args)
        self.args = args
        self.tokenizer: Tokenizer | None = None
        if args.model == "synthetic":
            self.cfg = ModelConfig(args.num_layers, args.hidden, args.num_qo_heads, args.num_kv_heads, args.head_dim,
                                   args.intermediate, args.vocab, seed=args.seed)
            self.model = TinyLlama(self.cfg)
            self.requests = synthetic_requests(args.requests, vocab=args.vocab, max_prompt=args.max_prompt,
                                               max_new_tokens=args.max_new_tokens, seed=args.seed,
                                               arrival_rate=args.arrival_rate, parallel_frac=args.parallel_frac,
                                               temperature=args.temperature)
            num_layers, num_kv_heads, head_dim, self.max_len = (args.num_layers, args.num_kv_heads, args.head_dim,
                                                                args.max_prompt + args.max_new_tokens)
        else:
            gf = open_gguf(args.gguf or default_model_path())
            spec = gf.spec
            self.tokenizer = Tokenizer.from_gguf(gf)
            self.model = LlamaModel.from_gguf(gf)
            self.cfg = spec
            self.requests = chat_requests(self.tokenizer, args.requests, max_new_tokens=args.max_new_tokens,
                                          seed=args.seed, stop_token_ids=spec.stop_token_ids,
                                          arrival_rate=args.arrival_rate, parallel_frac=args.parallel_frac,
                                          temperature=args.temperature)
            num_layers, num_kv_heads, head_dim = spec.num_layers, spec.num_kv_heads, spec.head_dim
            self.max_len = max(r.max_len for r in self.requests) + 1
        self.cache = PagedKVCache(num_layers, num_kv_heads, head_dim, args.page_size, args.num_pages)
        self.sched = Scheduler(self.cache, max_batch=args.max_batch, max_tokens_per_step=args.max_tokens_per_step)
        self.finished: list[Sequence] = []
        capacity = args.num_pages * args.page_size
        for r in self.requests:
            if r.max_len > capacity:
                raise ValueError(f"request {r.req_id} needs {r.max_len} tokens, the pool holds {capacity}: "
                                 "raise --num-pages or lower --max-prompt / --max-new-tokens")
        self.stats = Counter()
        self.max_abs_diff = 0.0
        self.event_checks = Counter()
        self.check_s = 0.0  # time spent in the reference, left out of the throughput
        self.kv = Counter()  # slot and page sums over steps, and the peak step's

    # -- sequences ---------------------------------------------------------------------------------
    def _new_sequence(self, request, sample: int, tokens) -> Sequence:
        g = torch.Generator().manual_seed(self.args.seed * 1_000_003 + request.req_id * 16 + sample)
        return Sequence(f"r{request.req_id}.{sample}", request, list(tokens), g)

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> int:
        t = seq.request.temperature
        if t <= 0:
            return int(torch.argmax(logits))
        return int(torch.multinomial(torch.softmax(logits / t, dim=-1), 1, generator=seq.generator))

    # -- one step ----------------------------------------------------------------------------------
    def step(self, step_no: int) -> int:
        """Run one engine step; returns tokens generated."""
        picked = self.sched.next_step()
        if picked is None:
            return 0
        step, batch = picked
        self.stats["steps"] += 1
        self.stats["decode_steps" if step.is_decode else "prefill_steps"] += 1
        self.stats["cow_copies"] += step.copied_pages
        for s, n in batch:
            if s.pending > 1:  # prefilling (a prompt, or a preempted history being recomputed)
                self.stats["prefill_tokens"] += n
                if s.num_computed > s.cached_at_admission:  # a chunk attending to earlier chunks of its own
                    s.events.add("chunk")
                    self.stats["chunked_prefills"] += 1
        tokens = torch.tensor([t for s, n in batch for t in s.tokens[s.num_computed:s.num_computed + n]])
        last_rows = step.cu_seqlens_q[1:].long() - 1

        def paged_attention(layer, q, k, v):
            self.cache.write(layer, step, k, v)
            return self.cache.attention(layer, step, q)

        logits = self.model.forward(tokens, step.positions, paged_attention, logit_rows=last_rows)
        for s, n in batch:
            s.num_computed += n
        self._check(step_no, batch, logits)
        generated = 0
        for (s, _), row in zip(batch, logits):
            s.events.clear()
            if s.pending:
                continue  # mid-prompt chunk: its logits are not sampled
            if s.needs_fork:
                s.needs_fork = False
                for i in range(1, s.request.n):
                    child = self._new_sequence(s.request, i, s.tokens)
                    child.num_computed = s.num_computed
                    self.cache.fork(s.seq_id, child.seq_id)
                    self.stats["forks"] += 1
                    self.stats["fork_shared_pages"] += len(self.cache.allocator.pages_of(s.seq_id))
                    child.events.add("fork_cow")
                    child.tokens.append(self._sample(child, row))
                    self.sched.add_running(child)
                    generated += 1
                    self._maybe_finish(child)
                s.events.add("fork_cow")
            s.tokens.append(self._sample(s, row))
            generated += 1
            self._maybe_finish(s)
        self._account_kv()
        return generated

    def _maybe_finish(self, seq: Sequence) -> None:
        if seq.tokens[-1] in seq.request.stop_token_ids:
            seq.stopped = True
        if seq.finished:
            self.finished.append(seq)
            self.sched.finish(seq)
            self.stats["finished_sequences"] += 1
            self.stats["generated_tokens"] += seq.num_generated

    def _check(self, step_no: int, batch, logits) -> None:
        """Compare some sequences' last-row logits with a from-scratch contiguous forward of their history."""
        a = self.args
        chosen = {}
        for b, (s, _) in enumerate(batch):  # the first occurrences of each event, always
            for e in s.events & set(EVENTS):
                if self.event_checks[e] < 2:
                    self.event_checks[e] += 1
                    chosen[b] = s
        if a.check_every and step_no % a.check_every == 0:
            for j in range(min(a.check_seqs, len(batch))):
                b = (step_no // a.check_every + j) % len(batch)
                chosen[b] = batch[b][0]
        for b, s in sorted(chosen.items()):
            t0 = time.perf_counter()
            ref = contiguous_logits(self.model, s.tokens[:s.num_computed])
            self.check_s += time.perf_counter() - t0
            diff = float((logits[b] - ref).abs().max())
            self.max_abs_diff = max(self.max_abs_diff, diff)
            self.stats["checks"] += 1
            if not diff <= LOGITS_ATOL + LOGITS_RTOL * float(ref.abs().max()):
                raise LogitsMismatch(f"step {step_no}, sequence {s.seq_id} at {s.num_computed} tokens: paged logits "
                                     f"differ from contiguous attention by {diff:.3g} (max |logit| "
                                     f"{float(ref.abs().max()):.3g}, tolerance {LOGITS_ATOL} + {LOGITS_RTOL} x that)")
            self.stats["checks_passed"] += 1

    def _account_kv(self) -> None:
        """Pages held by live sequences against the tokens they hold (shared pages counted once), and against
        contiguous allocation: each sequence reserving the longest sequence the server admits (max prompt + max
        new tokens, vLLM's comparison), or, knowing the future, its own final length (oracle)."""
        alloc, ps = self.cache.allocator, self.cache.page_size
        fill, live, oracle = {}, 0, 0
        for s in self.sched.running:
            n = alloc.seq_len(s.seq_id)
            if not n:
                continue
            live += 1
            oracle += s.request.max_len
            for i, page in enumerate(alloc.pages_of(s.seq_id)):
                fill[page] = max(fill.get(page, 0), min(ps, n - i * ps))
        used, tokens = len(fill), sum(fill.values())
        contiguous = live * self.max_len
        k = self.kv
        k["used"] += used
        k["tokens"] += tokens
        k["seq_steps"] += live
        k["contiguous"] += contiguous
        k["oracle"] += oracle
        if used > k["peak_used"]:
            k["peak_used"], k["peak_tokens"], k["peak_contiguous"] = used, tokens, contiguous

    # -- the run -----------------------------------------------------------------------------------
    def warm_up(self) -> float:
        """Compile (or load from the disk cache) the four kernels on a scratch cache; returns seconds."""
        t0 = time.perf_counter()
        m = self.model
        scratch = PagedKVCache(1, m.num_kv_heads, m.head_dim, self.args.page_size, 4)
        q = torch.zeros(2, m.num_qo_heads, m.head_dim)
        kv = torch.zeros(2, m.num_kv_heads, m.head_dim)
        scratch.add_sequence("a")
        st = scratch.begin_step(["a"], 2)  # prefill + write
        scratch.write(0, st, kv, kv)
        scratch.attention(0, st, q)
        scratch.fork("a", "b")
        st = scratch.begin_step(["a", "b"], 1)  # copy-on-write + decode
        scratch.write(0, st, kv, kv)
        scratch.attention(0, st, q)
        return time.perf_counter() - t0

    def run(self) -> dict:
        compile_s = self.warm_up()
        pending = sorted(self.requests, key=lambda r: r.arrival)
        total = sum(r.n * r.max_new_tokens for r in self.requests)
        bar = tqdm(total=total, unit="tok", desc="serving", disable=self.args.no_progress, file=sys.stderr)
        t0, step_no, i = time.perf_counter(), 0, 0
        try:
            while i < len(pending) or self.sched.running or self.sched.waiting:
                if not self.sched.running and not self.sched.waiting:
                    step_no = max(step_no, pending[i].arrival)  # idle: skip ahead to the next arrival
                while i < len(pending) and pending[i].arrival <= step_no:
                    r = pending[i]
                    seq = self._new_sequence(r, 0, r.prompt)
                    seq.needs_fork = r.n > 1
                    self.sched.add(seq)
                    i += 1
                bar.update(self.step(step_no))
                bar.set_postfix(run=len(self.sched.running), wait=len(self.sched.waiting),
                                free=self.cache.num_free_pages, refresh=False)
                step_no += 1
        finally:
            bar.close()
        return self._summary(time.perf_counter() - t0, compile_s)

    def answers(self, limit: int) -> list[dict]:
        """The first ``limit`` requests' prompts and their samples' text (a real model only)."""
        if self.tokenizer is None:
            return []
        by_request: dict[int, list[Sequence]] = {}
        for seq in self.finished:
            by_request.setdefault(seq.request.req_id, []).append(seq)
        out = []
        for rid in sorted(by_request)[:limit]:
            seqs = sorted(by_request[rid], key=lambda q: q.seq_id)
            r = seqs[0].request
            out.append({"prompt": r.text, "n": r.n, "answers": [
                self.tokenizer.decode(q.tokens[len(r.prompt):], skip_special_tokens=True).strip() for q in seqs]})
        return out

    def kernels_line(self) -> str:
        """Which decode schedule this run used on this CPU (tuned, or defaults and how to tune them)."""
        cfg = KernelConfig("decode", TORCH_DTYPE_NAMES[self.cache.dtype], self.cfg.num_qo_heads, self.cache.num_kv_heads,
                           self.cache.head_dim, self.cache.page_size)
        return tuned_knobs.describe(cfg, targets.local_target())

    def _summary(self, wall: float, compile_s: float) -> dict:
        st, sc, k, ps = self.stats, self.sched.counters, self.kv, self.cache.page_size
        serving = max(1e-9, wall - self.check_s)
        waste = 1 - k["tokens"] / max(1, k["used"] * ps)
        return dict(
            requests=len(self.requests), sequences=st["finished_sequences"], steps=st["steps"],
            decode_steps=st["decode_steps"], prefill_steps=st["prefill_steps"],
            generated_tokens=st["generated_tokens"], prefill_tokens=st["prefill_tokens"],
            wall_s=round(wall, 3), compile_s=round(compile_s, 3), check_s=round(self.check_s, 3),
            tokens_per_s=round(st["generated_tokens"] / serving, 1),
            all_tokens_per_s=round((st["generated_tokens"] + st["prefill_tokens"]) / serving, 1),
            num_pages=self.cache.num_pages, page_size=ps,
            peak_pages_used=k["peak_used"], peak_pages_needed=round(k["peak_tokens"] / ps, 1),
            kv_waste_pct=round(100 * waste, 2),
            kv_waste_pages_per_seq=round((k["used"] * ps - k["tokens"]) / ps / max(1, k["seq_steps"]), 3),
            contiguous_peak_pages=round(k["peak_contiguous"] / ps, 1),
            contiguous_waste_pct=round(100 * (1 - k["tokens"] / max(1, k["contiguous"])), 2),
            contiguous_oracle_waste_pct=round(100 * (1 - k["tokens"] / max(1, k["oracle"])), 2),
            prompt_tokens=sc["prompt_tokens"], prefix_cached_tokens=sc["prefix_cached_tokens"],
            prefix_hit_rate_pct=round(100 * sc["prefix_cached_tokens"] / max(1, sc["prompt_tokens"]), 2),
            prefix_hit_requests=sc["prefix_hits"],
            forks=st["forks"], fork_shared_pages=st["fork_shared_pages"], cow_copies=st["cow_copies"],
            fork_pages_saved=st["fork_shared_pages"] - st["cow_copies"],
            chunked_prefills=st["chunked_prefills"], preemptions=sc["preemptions"],
            preempted_tokens=sc["preempted_tokens"],
            recompute_cached_tokens=sc["recompute_cached_tokens"],
            checks=st["checks"], checks_passed=st["checks_passed"], max_abs_logit_diff=self.max_abs_diff,
            kernels=self.kernels_line(),
            model=self.args.model if self.tokenizer is None else str(self.args.gguf or default_model_path().name),
            answers=self.answers(self.args.show),
        )
