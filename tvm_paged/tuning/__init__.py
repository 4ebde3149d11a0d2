"""Autotuning of the kernels' builder knobs per target, through MetaSchedule's own parts.

- ``workload``: buckets (batch x max pages per sequence), the kernel specialized to one, and the picklable pieces
  MetaSchedule's builder and runner workers call (a lean build, valid paged inputs, a timing loop).
- ``space``: the knob space as a finite set, knob features, and choosing what to measure next (random without
  replacement, then MetaSchedule's XGBoost cost model over knob features, or mutate-the-best).
- ``records``: the tuning log (``JSONDatabase`` + a side table of knobs and GB/s per record) and resuming from it.
- ``search``: the loop that ties them together (:func:`~tvm_paged.tuning.search.tune`).

``tvm_paged.tune`` is the command line over it; ``tvm_paged.tuned_knobs`` reads what it writes.
"""
