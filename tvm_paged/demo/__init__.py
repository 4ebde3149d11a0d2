"""The model loop: a small Llama-style decoder served with continuous batching on :class:`~tvm_paged.PagedKVCache`.

- ``model``: weights and forward pass, attention pluggable (paged cache or contiguous reference).
- ``workload``: synthetic requests.
- ``scheduler``: continuous batching, chunked prefill, prefix-cache admission, preemption by recompute.
- ``engine``: the model loop: a paged step, sampling and forks, the logits checks, the summary's numbers.
- ``serve``: the ``tvm-paged demo`` command (``add_arguments``, ``run``, ``main``) and the printed summary.
"""
