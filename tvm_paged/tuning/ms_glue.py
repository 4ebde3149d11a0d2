"""MetaSchedule glue for the tuner: logging around ``tune_tir``, its search strategy, measure callbacks, a runner
that measures in this process, and its postprocessors applied by hand.

Everything here reaches TVM through the names :mod:`tvm_paged.tvm_compat` spells (``meta_schedule()``,
``derived_object``, ``PyRunner``, ...), so a TVM rename stays a change to that one module.
"""

from __future__ import annotations

import contextlib
import logging
import os

from .. import tvm_compat as tc

_DEVNULL = None  # the stream MetaSchedule's console log goes to when quiet (opened once, kept open)


@contextlib.contextmanager
def meta_schedule_logging(quiet: bool = False):
    """Around a ``tune_tir`` call: MetaSchedule 0.27 rebuilds its logging config from the names of its logger's
    handlers and fails (``'NoneType' object has no attribute 'format'``) when one has no name, as the capture
    handlers pytest attaches do after a first run in the same process. Unnamed handlers are detached for the call
    and put back after. ``quiet``: its console log (a task table per round, on stdout) is dropped; the log files
    in the work directory keep everything."""
    global _DEVNULL
    logger = logging.getLogger(tc.meta_schedule().__name__)  # MetaSchedule logs under its package's name
    unnamed = [h for h in logger.handlers if h.get_name() is None]
    for h in unnamed:
        logger.removeHandler(h)
    try:
        if quiet:
            # Kept open: MetaSchedule's console handler holds on to the stream it was configured with, and its
            # runner and builder log through it again when the next bucket starts.
            if _DEVNULL is None:
                _DEVNULL = open(os.devnull, "w")  # noqa: SIM115
            with contextlib.redirect_stdout(_DEVNULL):
                yield
        else:
            yield
    finally:
        for h in unnamed:
            logger.addHandler(h)


def measure_callbacks(on_results):
    """MetaSchedule's default measure callbacks plus one that calls ``on_results(run_secs)`` after each batch of
    measurements: one list of seconds per candidate (empty when the candidate failed)."""

    @tc.derived_object
    class _Results(tc.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            on_results([[float(x) for x in (r.run_secs or [])] if r.error_msg is None else []
                        for r in runner_results])

    return [*tc.MeasureCallback.create("default"), _Results()]


def evolutionary_search(population: int = 512):
    """MetaSchedule's evolutionary search strategy keeping ``population`` candidates per round (the sample of
    random initial candidates shrinks with it)."""
    return tc.meta_schedule().search_strategy.EvolutionarySearch(population_size=population,
                                                                 init_min_unmeasured=min(50, population))


def python_runner(measure):
    """A MetaSchedule runner that calls ``measure(artifact_path) -> list of seconds`` for each built candidate
    in this process (an exception is the candidate's error): for measuring by other means than TVM's runners."""

    @tc.derived_object
    class _Runner(tc.PyRunner):
        def run(self, runner_inputs):
            futures = []
            for ri in runner_inputs:
                try:
                    secs, err = [tc.tirx.FloatImm("float64", float(x)) for x in measure(ri.artifact_path)], None
                except Exception as e:  # noqa: BLE001  (reported as the candidate's failure)
                    secs, err = None, f"{type(e).__name__}: {e}"
                futures.append(tc.LocalRunnerFuture(secs, err))
            return futures

    return _Runner()


def apply_postprocs(sch, target) -> list[str]:
    """Apply MetaSchedule's postprocessors for ``target``'s kind to ``sch`` in place, as its search does to each
    candidate (CUDA: cooperative fetch, unbound blocks, unroll, reduction blocks, GPU code verification); returns
    the names of those that rejected it (empty: a valid candidate)."""
    ms = tc.meta_schedule()
    kind = "cuda" if target.kind.name == "cuda" else "llvm"
    ctx = ms.TuneContext(mod=sch.mod, target=target, task_name="postprocess", space_generator=ms.space_generator.
                         ScheduleFn(lambda _sch: None, sch_rules=[], postprocs=kind, mutator_probs=kind))
    return [type(p).__name__ for p in ctx.space_generator.postprocs if not p.apply(sch)]
