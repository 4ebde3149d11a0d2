"""Demo workloads: requests arriving over time with shared prompt prefixes, long prompts and parallel samples:
random token ids for the synthetic model, a built-in set of chat prompts for a real one."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Request:
    """``prompt`` token ids; ``n`` parallel samples (forks of one prompt); ``arrival`` the engine step it
    arrives at; ``temperature`` 0 for greedy, else seeded sampling."""

    req_id: int
    prompt: tuple
    max_new_tokens: int
    n: int
    arrival: int
    temperature: float
    stop_token_ids: frozenset = frozenset()  # ids that end a sample early (a chat model's end of turn)
    text: str | None = None  # the user's message, for a real model

    @property
    def max_len(self) -> int:
        """Tokens a sequence of this request ever holds in the cache (the last sampled one is never fed)."""
        return len(self.prompt) + self.max_new_tokens - 1


def synthetic_requests(num_requests: int, *, vocab: int, max_prompt: int, max_new_tokens: int, seed: int,
                       arrival_rate: float = 0.5, num_prefixes: int = 2, shared_frac: float = 0.6,
                       parallel_frac: float = 0.25, max_n: int = 3, temperature: float = 0.8) -> list[Request]:
    """``num_requests`` requests from ``seed``: a fraction ``shared_frac`` starts with one of ``num_prefixes``
    common prefixes (a system prompt, 1/3 to 1/2 of ``max_prompt`` long); prompt lengths spread up to
    ``max_prompt``; ``parallel_frac`` ask for 2..``max_n`` samples; output lengths spread over
    [max_new_tokens / 4, max_new_tokens]; arrivals a Poisson stream of ``arrival_rate`` per step (a few at 0)."""
    rng = np.random.default_rng(seed)
    prefixes = [rng.integers(0, vocab, rng.integers(max_prompt // 3, max_prompt // 2 + 1)).tolist()
                for _ in range(num_prefixes)]
    requests, t = [], 0.0
    for i in range(num_requests):
        if i >= 4:
            t += rng.exponential(1.0 / arrival_rate)
        if prefixes and rng.random() < shared_frac:
            prefix = prefixes[rng.integers(len(prefixes))]
            suffix = int(rng.integers(4, max(5, max_prompt - len(prefix) + 1)))
            prompt = prefix + rng.integers(0, vocab, suffix).tolist()
        else:
            prompt = rng.integers(0, vocab, rng.integers(min(8, max_prompt), max_prompt + 1)).tolist()
        n = int(rng.integers(2, max_n + 1)) if max_n > 1 and rng.random() < parallel_frac else 1
        new = int(rng.integers(max(1, max_new_tokens // 4), max_new_tokens + 1))
        requests.append(Request(i, tuple(prompt[:max_prompt]), new, n, int(t), temperature if n > 1 else 0.0))
    return requests


# Varied chat prompts: facts, code, writing, reasoning, lists, another language.
CHAT_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "Write a Python function that reverses a string.",
    "Give me three tips for sleeping better.",
    "What is 17 times 23? Show your steps.",
    "Translate 'Good morning, how are you?' into Spanish.",
    "Summarize the plot of Romeo and Juliet in one paragraph.",
    "Why is the sky blue?",
    "List the planets of the solar system in order.",
    "Write a short, friendly email declining a meeting invitation.",
    "What is the difference between a list and a tuple in Python?",
    "Suggest a name for a coffee shop run by cats.",
    "How do vaccines work?",
    "Write a limerick about a programmer.",
    "What are the main causes of climate change?",
)


def chat_requests(tokenizer, num_requests: int, *, max_new_tokens: int, seed: int, stop_token_ids,
                  arrival_rate: float = 0.5, parallel_frac: float = 0.25, max_n: int = 3,
                  temperature: float = 0.8) -> list[Request]:
    """``num_requests`` chat requests cycling through :data:`CHAT_PROMPTS`, rendered with the model's chat template
    (every prompt then starts with the same system prompt: prefix-cache hits), arriving as a Poisson stream;
    ``parallel_frac`` ask for 2..``max_n`` samples at ``temperature`` (the others are greedy); a sample ends at a
    stop token or after ``max_new_tokens``."""
    rng = np.random.default_rng(seed)
    requests, t = [], 0.0
    for i in range(num_requests):
        if i >= 4:
            t += rng.exponential(1.0 / arrival_rate)
        text = CHAT_PROMPTS[i % len(CHAT_PROMPTS)]
        ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]))
        n = int(rng.integers(2, max_n + 1)) if max_n > 1 and rng.random() < parallel_frac else 1
        requests.append(Request(i, tuple(ids), max_new_tokens, n, int(t), temperature if n > 1 else 0.0,
                                frozenset(stop_token_ids), text))
    return requests
