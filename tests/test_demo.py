"""The demo end to end, in process, on a tiny model and a pool small enough to force every path: prefix hits,
chunked prefill, forks with copy-on-write, preemption and recompute. A corrupted paged path must fail it."""

import json

import pytest
import torch

from tvm_paged import cache as cache_mod
from tvm_paged import cli
from tvm_paged.demo import engine, serve

TINY = ["--model", "synthetic", "--num-layers", "2", "--hidden", "64", "--num-qo-heads", "4", "--num-kv-heads", "2", "--head-dim", "16",
        "--intermediate", "128", "--vocab", "100", "--page-size", "4", "--num-pages", "20", "--requests", "10",
        "--max-prompt", "24", "--max-new-tokens", "10", "--max-tokens-per-step", "16", "--parallel-frac", "0.5",
        "--check-every", "2", "--no-progress"]


def test_demo_tiny_exercises_every_path(tmp_path, capsys):
    out = tmp_path / "summary.json"
    assert serve.main(TINY + ["--json", str(out)]) == 0
    s = json.loads(out.read_text())
    assert s["checks"] > 0 and s["checks_passed"] == s["checks"]
    assert s["preemptions"] >= 1
    assert s["forks"] >= 1 and s["cow_copies"] >= 1 and s["fork_pages_saved"] > 0
    assert s["prefix_hit_requests"] >= 1 and s["prefix_cached_tokens"] > 0
    assert s["chunked_prefills"] >= 1
    expected = sum(r.n * r.max_new_tokens for r in engine.Engine(serve_args(TINY)).requests)
    assert s["generated_tokens"] == expected  # every request completed, preempted ones included
    assert s["peak_pages_used"] <= s["num_pages"]
    printed = capsys.readouterr().out
    assert f"{s['checks']}/{s['checks']} passed" in printed and "preemptions" in printed


def serve_args(argv):
    """The parsed options of the demo, as the command line builds them."""
    import argparse

    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    return serve.fill_defaults(p.parse_args(argv))


def test_demo_through_cli_is_deterministic(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    argv = TINY + ["--requests", "4", "--seed", "3"]
    assert cli.main(["demo", *argv, "--json", str(a)]) == 0
    assert serve.main(argv + ["--json", str(b)]) == 0
    keep = lambda d: {k: v for k, v in d.items() if not k.endswith("_s") and "per_s" not in k}  # noqa: E731
    assert keep(json.loads(a.read_text())) == keep(json.loads(b.read_text()))


def _perturbed_attention(self, layer, step, q, **kw):
    return _ORIGINAL_ATTENTION(self, layer, step, q, **kw) * 1.02


def _skip_cow_copies(k_cache, v_cache, src, dst):
    pass


_ORIGINAL_ATTENTION = cache_mod.PagedKVCache.attention


@pytest.mark.parametrize("corruption", ["attention_output", "copy_on_write"])
def test_demo_fails_on_a_corrupted_paged_path(monkeypatch, capsys, corruption):
    if corruption == "attention_output":
        monkeypatch.setattr(cache_mod.PagedKVCache, "attention", _perturbed_attention)
    else:  # forks then read pages their siblings overwrote
        monkeypatch.setattr(cache_mod.ops, "copy_pages", _skip_cow_copies)
    assert serve.main(TINY) == 1
    assert "logits check FAILED" in capsys.readouterr().err


def test_demo_rejects_a_pool_too_small_for_one_request(capsys):
    assert serve.main(TINY + ["--num-pages", "4"]) == 2
    assert "--num-pages" in capsys.readouterr().err


def test_contiguous_reference_matches_incremental_decode():
    """The reference itself: the logits of a history computed at once equal those of a token-by-token run with
    an explicit growing K/V (guards the check against a RoPE/causality bug shared by both paths)."""
    from tvm_paged.demo.model import ModelConfig, TinyLlama, contiguous_logits

    m = TinyLlama(ModelConfig(num_layers=2, hidden=64, num_qo_heads=4, num_kv_heads=2, head_dim=16,
                              intermediate=128, vocab=100))
    tokens = torch.randint(0, 100, (9,), generator=torch.Generator().manual_seed(0))
    hist = [([], []) for _ in range(2)]

    def growing(layer, q, k, v):
        ks, vs = hist[layer]
        ks.append(k)
        vs.append(v)
        kk = torch.cat(ks).repeat_interleave(2, dim=1)
        vv = torch.cat(vs).repeat_interleave(2, dim=1)
        p = torch.softmax(torch.einsum("qhd,khd->hqk", q, kk) * 16 ** -0.5, dim=-1)
        return torch.einsum("hqk,khd->qhd", p, vv)

    for i, t in enumerate(tokens):
        last = m.forward(t[None], torch.tensor([i]), growing)[0]
    torch.testing.assert_close(last, contiguous_logits(m, tokens), atol=1e-4, rtol=1e-4)
