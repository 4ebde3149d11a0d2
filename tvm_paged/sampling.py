"""Sampling parameters (vLLM's ``SamplingParams``) and drawing the next token from a row of logits.

Greedy when ``temperature`` is 0 (or below 1e-5, as vLLM); otherwise logits / temperature, then top-k, then top-p (nucleus), then a draw
from each sequence's own ``torch.Generator``, so a seeded request gives the same completions whatever else is in
the batch and whether or not it was preempted and recomputed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How to sample one request's completions.

    ``n``: completions per prompt (they share the prompt's pages: fork and copy-on-write); ``temperature``: 0 is
    greedy; ``top_p`` in (0, 1]; ``top_k``: -1 (or 0) keeps every token; ``seed``: makes the completions
    reproducible; ``max_tokens``: new tokens at most (``None``: up to the model's context); ``stop``: strings that
    end a completion (the text stops before them); ``ignore_eos``: keep generating past the end-of-sequence
    token.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    max_tokens: int | None = 16
    stop: list[str] | str | None = None
    ignore_eos: bool = False
    stop_strings: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Check every field (``ValueError`` naming it); run at construction and again by each call that takes
        the parameters, since a dataclass's fields can be changed after it is made."""
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n: must be an int >= 1, got {self.n!r}")
        if not _is_number(self.temperature) or not _finite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature: must be a finite number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k: must be an int >= -1 (-1 or 0: no limit), got {self.top_k!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed: must be an int or None, got {self.seed!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens: must be an int >= 1 or None, got {self.max_tokens!r}")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop: must be a non-empty string or a list of them, got {self.stop!r}")
        self.stop_strings = tuple(stop)

    @property
    def greedy(self) -> bool:
        """Temperatures below :data:`GREEDY_BELOW` sample greedily: dividing float32 logits by them overflows."""
        return self.temperature < GREEDY_BELOW


# vLLM's threshold: a temperature this small is greedy in all but rounding.
GREEDY_BELOW = 1e-5


def _finite(x) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an int beyond float's range
        return False


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token id from ``logits`` [vocab] float32."""
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[0]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the token that crosses it included).
        drop = (sorted_probs.cumsum(0) - sorted_probs) >= params.top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def sequence_generator(seed: int | None, sample_index: int) -> torch.Generator:
    """The generator of one completion: from the request's seed and the completion's index when seeded, else from
    torch's global random state."""
    g = torch.Generator()
    if seed is None:
        g.manual_seed(int(torch.randint(0, 2**62, (1,))))
    else:
        g.manual_seed((seed * 1_000_003 + sample_index) % 2**63)
    return g
