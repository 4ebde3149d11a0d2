"""The real model served on the paged cache, against Hugging Face transformers on the same GGUF weights.

HF's eager float32 forward is the oracle for logits (prefill in chunks, a prefix-cache hit, 20 decode steps);
HF's greedy ``generate``, one prompt at a time, is the oracle for 16 prompts generated together with continuous
batching (vLLM's rule where they part: HF's top two logits there must be a near tie). Then the API's contract:
seeded sampling reproducible, preemption changing no greedy output, stop strings, bad input.
"""

from __future__ import annotations

import pytest
import torch

from hf_oracle import hf_model, hf_tokenizer

from tvm_paged import LLM, SamplingParams
from tvm_paged.cache import PagedKVCache

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
    "Water boils at",
    "List three fruits:",
    "Translate to French: Good morning, my friend.",
    "The theory of relativity was developed by",
    "import numpy as np\n\nx = np.",
    "My favourite season is autumn because",
    "Q: What is 12 times 12?\nA:",
    "The largest planet in the solar system is",
    "Here is a short poem about the moon:\n",
    "In computer science, a hash table is",
    "The quick brown fox",
    "Dear team, I am writing to let you know that",
]
TIE = 1e-3  # HF's top-2 logits this close: either token is a correct greedy choice


@pytest.fixture(scope="module")
def llm():
    return LLM(max_batch=16, max_tokens_per_step=256)


def _hf_logits(ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model()(torch.tensor([ids])).logits[0].float()  # [len(ids), vocab]


def _paged_logits(llm, seq_id, ids, new_from, chunk) -> torch.Tensor:
    """Feed ``ids[new_from:]`` through the paged cache in chunks of ``chunk`` tokens (after a prefix-cache hit of
    ``new_from`` tokens, or none); returns the logits of every fed position [len(ids) - new_from, vocab]."""
    cache, model = llm.cache, llm.model
    rows = []
    pos = new_from
    while pos < len(ids):
        n = min(chunk, len(ids) - pos)
        step = cache.begin_step([seq_id], n, token_ids=[ids[pos:pos + n]])

        def attention(layer, q, k, v):
            cache.write(layer, step, k, v)
            return cache.attention(layer, step, q)

        rows.append(model.forward(torch.tensor(ids[pos:pos + n]), step.positions, attention))
        pos += n
    return torch.cat(rows)


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> float:
    scale = float(want.abs().max())
    err = float((got - want).abs().max())
    assert err <= 1e-3 * max(1.0, scale), f"{what}: max |diff| {err:.3g}, logits scale {scale:.3g}"
    return err


def test_logits_match_hf_through_chunks_prefix_hit_and_decode(llm):
    tok = llm.get_tokenizer()
    base = tok.encode("You are a careful assistant. Answer briefly and precisely. " * 3)
    prompts = [base + tok.encode(" What is the boiling point of water at sea level?"),
               base + tok.encode(" Name the author of Hamlet."),  # shares `base`'s full pages: a prefix hit
               tok.encode("Hi")]
    for i, prompt in enumerate(prompts):
        seq = f"logits{i}"
        cached = llm.cache.add_sequence(seq, prompt)
        if i == 1:
            assert cached >= llm.cache.page_size, "the second prompt should reuse the first one's pages"
        ids = list(prompt)
        got = [_paged_logits(llm, seq, ids, cached, chunk=13)]  # prefill in 13-token chunks
        for _ in range(20):  # greedy decode, one token per step
            ids.append(int(got[-1][-1].argmax()))
            got.append(_paged_logits(llm, seq, ids, len(ids) - 1, chunk=1))
        llm.cache.free(seq)
        _close(torch.cat(got), _hf_logits(ids)[cached:], f"prompt {i}")


def test_greedy_generation_matches_hf_generate(llm):
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    outs = llm.generate(PROMPTS, params)
    tok = hf_tokenizer()
    model = hf_model()
    ties = 0
    for prompt, out in zip(PROMPTS, outs):
        ids = tok.encode(prompt, add_special_tokens=False)
        assert out.prompt_token_ids == ids
        with torch.no_grad():
            # eos_token_id=None: past the end-of-sequence token, like ignore_eos (which does not suppress it)
            ref = model.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False, eos_token_id=None,
                                 pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()
        assert len(out.token_ids) == 48 and out.finish_reason == "length"
        for j, (a, b) in enumerate(zip(out.token_ids, ref)):
            if a != b:  # they part: allowed only at a near tie of HF's own top two logits
                top2 = _hf_logits(ids + ref[:j])[-1].topk(2).values
                assert float(top2[0] - top2[1]) <= TIE, f"{prompt!r}: token {j}: {a} != {b}, not a tie {top2}"
                ties += 1
                break
    print(f"greedy: {ties} of {len(PROMPTS)} prompts parted from HF at a tie")
    assert ties <= 2, f"{ties} of {len(PROMPTS)} prompts parted from HF at a tie"


def test_chat_answers_and_stops(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0.0, max_tokens=64))[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop" and out.token_ids[-1] in llm.spec.stop_token_ids
    assert "<|im_end|>" not in out.text


def test_seeded_parallel_samples_are_reproducible(llm):
    conv = [{"role": "user", "content": "Write a haiku about the sea."}]
    params = SamplingParams(n=3, temperature=0.8, top_p=0.95, top_k=50, seed=1, max_tokens=24)
    a = llm.chat(conv, params)[0]
    b = llm.chat([conv, [{"role": "user", "content": "Say hello."}]], params)[0]  # other neighbours this time
    assert len(a.outputs) == 3
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1, "three samples at temperature 0.8 all equal"
    assert llm.stats["forks"] >= 2


def test_preemption_changes_no_greedy_output(llm):
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    want = [o.token_ids for o in llm.generate(PROMPTS[:6], params)]
    tiny = LLM(num_pages=24, page_size=4, max_batch=6, max_tokens_per_step=64)  # 96 tokens for 6 sequences of ~50
    got = tiny.generate(PROMPTS[:6], params)
    assert tiny.stats["preemptions"] > 0
    assert [o.token_ids for o in got] == want


def test_stop_strings_never_leak(llm):
    out = llm.generate(["Count: one, two, three, four, five,"], SamplingParams(temperature=0.0, max_tokens=32,
                                                                                 stop=[" seven"]))[0]
    assert " seven" not in out.text and out.finish_reason == "stop"
    assert llm.get_tokenizer().decode(out.token_ids, skip_special_tokens=True).find(" seven") >= len(out.text)


def test_prompt_token_ids_and_order(llm):
    tok = llm.get_tokenizer()
    ids = [tok.encode(p) for p in PROMPTS[:4]]
    params = SamplingParams(temperature=0.0, max_tokens=8)
    by_ids = llm.generate(prompt_token_ids=ids, sampling_params=params)
    by_text = llm.generate(PROMPTS[:4], params)
    assert [o.token_ids for o in by_ids] == [o.token_ids for o in by_text]
    assert [o.request_id for o in by_ids] == [0, 1, 2, 3]


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=["ok", ""]), r"^prompts\[1\]: empty"),
    (dict(prompt_token_ids=[[1, 2], [5, 10**6]]), r"^prompt_token_ids\[1\]: token id 1000000"),
    (dict(prompt_token_ids=[[]]), r"^prompt_token_ids\[0\]: empty"),
    (dict(prompts=["x " * 9000]), r"^prompts\[0\]: .* context"),
    (dict(prompts=["a", "b"], sampling_params=[SamplingParams()]), r"^sampling_params"),
    (dict(prompt_token_ids=[[1, 2.9]]), r"^prompt_token_ids\[0\]: expected a list of ints"),  # not truncated
    (dict(prompt_token_ids=[["5"]]), r"^prompt_token_ids\[0\]: expected a list of ints"),
    (dict(prompt_token_ids=[[True]]), r"^prompt_token_ids\[0\]: expected a list of ints"),
])
def test_bad_requests_raise_before_running(llm, kwargs, match):
    steps = llm.stats.get("steps")
    with pytest.raises(ValueError, match=match):
        llm.generate(**kwargs)
    assert llm.stats.get("steps") == steps  # nothing ran
    assert llm.cache.num_free_pages == llm.cache.num_pages  # no sequence holds pages


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_tokens=0), "^max_tokens"), (dict(temperature=-0.1), "^temperature"), (dict(top_p=0.0), "^top_p"),
    (dict(top_p=1.5), "^top_p"), (dict(top_k=-2), "^top_k"), (dict(n=0), "^n:"), (dict(stop=[""]), "^stop"),
])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("field, value", [("max_tokens", 0), ("max_tokens", -5), ("temperature", -1.0),
                                          ("n", 0), ("top_p", 2.0), ("temperature", 10**400)])
def test_sampling_params_changed_after_construction_are_checked(llm, field, value):
    """A dataclass's fields can be set after it is made: generate checks them again, before anything runs."""
    params = SamplingParams(max_tokens=2)
    setattr(params, field, value)
    steps = llm.stats.get("steps")
    with pytest.raises(ValueError, match=rf"^sampling_params\[0\]\.{field}: "):
        llm.generate(["Hello"], params)
    assert llm.stats.get("steps") == steps and llm.cache.num_free_pages == llm.cache.num_pages


def test_tiny_temperature_is_greedy(llm):
    """Logits divided by 1e-40 overflow float32; like vLLM, temperatures below 1e-5 sample greedily."""
    greedy = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=4, temperature=0))[0].outputs[0].token_ids
    tiny = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=4, temperature=1e-40))[0].outputs[0].token_ids
    assert tiny == greedy


def test_a_second_concurrent_call_is_refused(llm, monkeypatch):
    """Two calls on one LLM would share sequence ids and prefix pages whose K/V one may read before the other
    writes them: while one runs, another thread's call raises, and the LLM serves the next call normally."""
    import threading

    running, release = threading.Event(), threading.Event()
    run = llm.generator.run

    def held_run(*args, **kwargs):
        running.set()
        release.wait(60)
        return run(*args, **kwargs)

    monkeypatch.setattr(llm.generator, "run", held_run)
    results = []
    first = threading.Thread(target=lambda: results.append(llm.generate(["Hi"], SamplingParams(max_tokens=2))))
    first.start()
    assert running.wait(60)
    try:
        with pytest.raises(RuntimeError, match="already running on this LLM"):
            llm.generate(["Hello"], SamplingParams(max_tokens=2))
    finally:
        release.set()
        first.join()
    assert len(results) == 1 and results[0][0].outputs[0].token_ids
    monkeypatch.setattr(llm.generator, "run", run)
    assert llm.generate(["Hello"], SamplingParams(max_tokens=2))[0].outputs[0].token_ids
    assert llm.cache.num_free_pages == llm.cache.num_pages


def test_ids_past_the_tokenizer_are_never_sampled(llm, monkeypatch):
    """A GGUF's embedding may have padding rows past the tokenizer's last token: the generator samples only ids the
    tokenizer has (here a vocabulary cut to 200 stands in for one)."""
    monkeypatch.setattr(llm.generator, "num_tokens", 200)
    outs = llm.generate(PROMPTS[:2], SamplingParams(max_tokens=8, temperature=1.5, seed=3, ignore_eos=True))
    ids = [t for o in outs for t in o.outputs[0].token_ids]
    assert len(ids) == 16 and max(ids) < 200


def test_chat_message_content_must_be_text(llm):
    with pytest.raises(ValueError, match=r"^messages\[0\]: "):
        llm.chat([{"role": "user", "content": None}])


def test_pool_too_small_for_a_request():
    small = LLM(num_pages=4, page_size=4)  # 16 tokens
    with pytest.raises(ValueError, match=r"^prompts\[0\]: .* KV pool"):
        small.generate(["word " * 40])
    with pytest.raises(ValueError, match=r"^sampling_params\[0\]\.max_tokens"):
        small.generate(["Hello"], SamplingParams(max_tokens=100))


def test_bad_model_files(tmp_path):
    with pytest.raises(ValueError, match="^gguf: "):
        LLM(gguf=tmp_path / "missing.gguf")
    (tmp_path / "text.gguf").write_text("not a model")
    with pytest.raises(ValueError, match="^gguf: "):
        LLM(gguf=tmp_path / "text.gguf")


def test_cache_is_the_paged_one(llm):
    assert isinstance(llm.cache, PagedKVCache) and llm.cache.num_pages > 0


def test_runs_on_an_exported_library(llm, tmp_path):
    """LLM(module=DIR) serves with a library from tvm-paged export (the edge path): the same greedy tokens, and
    the library's kernels are the ones that ran."""
    from tvm_paged.export import export

    spec = llm.spec
    export({"dtype": "float32", "num_qo_heads": spec.num_qo_heads, "num_kv_heads": spec.num_kv_heads,
            "head_dim": spec.head_dim, "page_size": 16}, "local", tmp_path)
    served = LLM(module=tmp_path, max_batch=4, num_pages=256)
    used = []
    provide = served.library._kernel
    served.library._kernel = lambda cfg, device: used.append(cfg.kernel) or provide(cfg, device)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    want = [o.token_ids for o in llm.generate(PROMPTS[:3], params)]
    assert [o.token_ids for o in served.generate(PROMPTS[:3], params)] == want
    assert {"decode", "prefill", "write_kv"} <= set(used)
    with pytest.raises(ValueError, match="^module: the library is for page_size 16"):
        LLM(module=tmp_path, page_size=8)
