"""Serving throughput of the real model against its peers, in one process, on this CPU (not a test).

The same chat prompts (the demo's prompts in four phrasings: they share the chat template's system prompt), greedy,
``--max-tokens`` new tokens each, all submitted at once:
- tvm_paged ``LLM.chat``: continuous batching on the paged cache with the compiled kernels;
- Hugging Face transformers ``generate_batch``: its continuous batching on its paged cache (``sdpa``);
- Hugging Face ``generate`` on left-padded batches of ``--hf-batch`` prompts;
- llama.cpp through ``llama-cpp-python`` on the same GGUF, one request at a time (only when it is installed).
Reported: output tokens/s (generated tokens over the wall time of the whole batch), time to first token (median
over requests, from submission), and how many completions equal tvm_paged's token for token.

    python tools/bench_serve.py [--prompts 64] [--max-tokens 128] [--hf-batch 16] [--skip hf-generate,llama.cpp]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from tvm_paged import LLM, SamplingParams, hostinfo
from tvm_paged import tvm_compat as tc
from tvm_paged.demo.workload import CHAT_PROMPTS

PHRASINGS = ("{}", "Please answer briefly: {}", "In simple words: {}", "As an expert, answer: {}")


def prompts(n: int) -> list[str]:
    return [PHRASINGS[(i // len(CHAT_PROMPTS)) % len(PHRASINGS)].format(CHAT_PROMPTS[i % len(CHAT_PROMPTS)])
            for i in range(n)]


def run_tvm_paged(llm: LLM, convs, max_tokens: int) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    t0 = time.perf_counter()
    outs = llm.chat(convs, params)
    wall = time.perf_counter() - t0
    gen = llm.generator
    return dict(name="tvm_paged LLM.chat (paged, continuous batching)", wall=wall,
                tokens=sum(len(o.token_ids) for o in outs), outputs=[o.token_ids for o in outs],
                ttft=statistics.median(gen.first_token_s.values()), split=dict(gen.seconds), stats=dict(gen.stats))


def run_hf_generate_batch(model, prompt_ids, max_tokens: int, stop_ids) -> dict:
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=list(stop_ids),
                           pad_token_id=stop_ids[0])
    t0 = time.perf_counter()
    results = model.generate_batch(inputs=prompt_ids, generation_config=cfg, record_timestamps=True)
    wall = time.perf_counter() - t0
    ordered = list(results.values())
    ttfts = [r.timestamps[0] - r.created_time for r in ordered if r.timestamps]
    return dict(name="HF transformers generate_batch (paged, continuous batching)", wall=wall,
                tokens=sum(len(r.generated_tokens) for r in ordered), outputs=[list(r.generated_tokens) for r in ordered],
                ttft=statistics.median(ttfts) if ttfts else None)


def run_hf_generate(model, tokenizer, prompt_ids, max_tokens: int, batch: int, stop_ids) -> dict:
    outputs, t0, first = [], time.perf_counter(), []
    pad = stop_ids[0]
    for start in range(0, len(prompt_ids), batch):
        chunk = prompt_ids[start:start + batch]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        t_chunk = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                                 eos_token_id=list(stop_ids), pad_token_id=pad)
        # A padded batch returns all its first tokens after one prefill: its first step's time, approximately.
        first.extend([t_chunk - t0] * len(chunk))
        for row in out[:, width:].tolist():
            n = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
            outputs.append(row[:n])
    wall = time.perf_counter() - t0
    return dict(name=f"HF transformers generate, padded batches of {batch}", wall=wall,
                tokens=sum(len(o) for o in outputs), outputs=outputs, ttft=None)


def run_llama_cpp(path, convs, max_tokens: int) -> dict | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(path), n_ctx=2048, n_threads=os.cpu_count(), verbose=False)
    t0, ttfts, tokens = time.perf_counter(), [], 0
    for conv in convs:
        t_req = time.perf_counter()
        first = None
        for chunk in llm.create_chat_completion(conv, max_tokens=max_tokens, temperature=0.0, stream=True):
            if first is None and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - t0
            tokens += 1 if chunk["choices"][0]["delta"].get("content") else 0
        ttfts.append(first if first is not None else time.perf_counter() - t_req)
    wall = time.perf_counter() - t0
    return dict(name="llama.cpp (llama-cpp-python), one request at a time", wall=wall, tokens=tokens, outputs=None,
                ttft=statistics.median(ttfts))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=64, help="tvm_paged: sequences running at once")
    ap.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    ap.add_argument("--skip", default="", help="comma-separated rows to leave out: hf-batch, hf-generate, llama.cpp")
    args = ap.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    llm = LLM(max_batch=args.max_batch)
    convs = [[{"role": "user", "content": p}] for p in prompts(args.prompts)]
    tok = llm.get_tokenizer()
    prompt_ids = [tok.encode(tok.apply_chat_template(c)) for c in convs]
    stop_ids = list(llm.spec.stop_token_ids)
    llm.chat(convs[:2], SamplingParams(temperature=0.0, max_tokens=4))  # compile (or load) the kernels first
    rows = [run_tvm_paged(llm, convs, args.max_tokens)]
    if not {"hf-batch", "hf-generate"} <= skip:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(llm.model_path.parent), gguf_file=llm.model_path.name,
                                                     dtype=torch.float32, attn_implementation="sdpa").eval()
        if "hf-batch" not in skip:
            rows.append(run_hf_generate_batch(model, prompt_ids, args.max_tokens, stop_ids))
        if "hf-generate" not in skip:
            rows.append(run_hf_generate(model, tok, prompt_ids, args.max_tokens, args.hf_batch, stop_ids))
    if "llama.cpp" not in skip:
        row = run_llama_cpp(llm.model_path, convs, args.max_tokens)
        if row is not None:
            rows.append(row)

    ours = rows[0]["outputs"]
    print(f"{len(convs)} chat prompts, greedy, max_tokens {args.max_tokens}, all submitted at once; "
          f"{llm.model_path.name}, float32")
    print(f"machine: {hostinfo.cpu_model_name() or platform.machine()}, {os.cpu_count()} cores (LLVM "
          f"{tc.host_cpu()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), TVM {tc.TVM_VERSION}")
    print("| engine | output tokens | wall s | output tok/s | TTFT median s | same tokens as tvm_paged |")
    print("| --- | --- | --- | --- | --- | --- |")
    base = rows[0]["tokens"] / rows[0]["wall"]
    for r in rows:
        rate = r["tokens"] / r["wall"]
        same = "" if r["outputs"] is None or r is rows[0] else \
            f"{sum(a == b for a, b in zip(ours, r['outputs']))}/{len(ours)}"
        ttft = "" if r["ttft"] is None else f"{r['ttft']:.2f}"
        print(f"| {r['name']} | {r['tokens']} | {r['wall']:.1f} | {rate:.1f} ({rate / base:.2f}x) | {ttft} | {same} |")
    split = rows[0]["split"]
    total = split.get("total", 0) or 1
    print(f"tvm_paged step time: attention kernels (K/V writes included) {split.get('attention', 0):.2f} s "
          f"({100 * split.get('attention', 0) / total:.0f}%), the rest of the model (torch) {split.get('model', 0):.2f} s "
          f"({100 * split.get('model', 0) / total:.0f}%), Python bookkeeping {split.get('python', 0):.2f} s "
          f"({100 * split.get('python', 0) / total:.0f}%); {rows[0]['stats'].get('steps', 0)} steps, "
          f"{rows[0]['stats'].get('prefix_cached_tokens', 0)} prompt tokens from the prefix cache")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
