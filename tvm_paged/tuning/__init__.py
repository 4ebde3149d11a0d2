"""Autotuning of the kernels' builder knobs per target, through MetaSchedule's own parts.

- ``workload``: buckets (batch x max pages per sequence), the kernel specialized to one, and the picklable build
  functions MetaSchedule's builder workers call (a lean build; CUDA through nvcc where no driver is loaded).
- ``measure``: the picklable pieces its runner workers call (valid paged inputs, a rotating timing loop, a check
  of each output against the float64 reference).
- ``space``: the knob space as a finite set, knob features, and choosing what to measure next (random without
  replacement, then MetaSchedule's XGBoost cost model over knob features, or mutate-the-best).
- ``records``: the tuning log (``JSONDatabase`` + a side table of knobs and GB/s per record) and resuming from it.
- ``search``: the loop that ties them together (:func:`~tvm_paged.tuning.search.tune`), the runner it measures
  with, and an RPC tracker and server to measure through.
- ``paged_space``, ``block_spaces``: MetaSchedule's own search over the block-form kernels (comparison only).
- ``ms_glue``: MetaSchedule glue (logging around ``tune_tir``, search strategy, measure callbacks, a Python runner,
  postprocessors), built on the names :mod:`tvm_paged.tvm_compat` spells.

``tvm_paged.tune`` is the command line over it; ``tvm_paged.tuned_knobs`` reads what it writes.
"""
