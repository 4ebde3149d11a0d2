"""MetaSchedule's own search (``tune_tir``) over two design spaces of the block-form attention kernels.

- ``generic``: MetaSchedule's space generator (``post-order-apply`` over the target's default schedule rules) on
  :func:`build_decode_generic` (decode only);
- ``paged``: the space written for paged attention (:mod:`tvm_paged.tuning.paged_space`, a ``ScheduleFn`` with
  sampled tile, split, lane and unroll decisions) on the weights form of the same kernel, and for prefill on
  :func:`~tvm_paged.kernels.prefill_blocks.build_prefill_blocks` (``q_len`` query rows per sequence). On a CUDA
  target (decode), its thread-bound version :func:`~tvm_paged.tuning.paged_space.decode_space_cuda`, measured on
  this machine's GPU or through an RPC tracker.

Both run MetaSchedule's evolutionary search with its XGBoost cost model on schedule features, specialized to a
bucket and measured by the same runner as the knob space (valid fragmented page tables, rotating tables, every
output checked against float64). The block-form kernels have static shapes and cannot prefetch, so nothing found
here is used at run time: the point is each space's number next to the shipped kernel's on the same bucket.

Per bucket and space it keeps ``summary.json`` (best GB/s, trials, failed trials including wrong outputs, the
best trace as text and, for ``paged``, its decisions by name) under ``<work_dir>/<space>/<bucket>/``;
MetaSchedule's own database and logs stay in that folder's ``ms/``, which is not meant to be committed (a few
hundred KB of traces per run).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

from tqdm import tqdm

from .. import tvm_compat as tc
from ..config import KernelConfig
from ..kernels.decode_generic import build_decode_generic
from ..kernels.prefill_blocks import build_prefill_blocks
from ..targets import cpu_vector_lanes, target_kind, with_host
from .measure import PagedInputs
from .ms_glue import evolutionary_search, measure_callbacks, meta_schedule_logging
from .paged_space import decisions, decode_space, decode_space_cuda, prefill_space
from .records import median_secs
from .search import TuneError, check_device, close_runner, make_runner, pool_mb
from .workload import ENTRY, Bucket, build_cuda_library, build_module, make_workload, pass_path

SPACES = {
    "generic": "MetaSchedule post-order-apply, default rules for the target",
    "paged": "tvm_paged.tuning.paged_space: ScheduleFn for paged attention",
}


def _workload(cfg: KernelConfig, bucket: Bucket, opts, device_kind: str = "cpu"):
    """The bucket's lengths and pool, as the knob space's runs measure it."""
    return make_workload(cfg, bucket, device_kind=device_kind, pool_mb=pool_mb(opts), pool_factor=opts.pool_factor,
                         tables=opts.tables, seed=opts.seed, q_len=opts.q_len if cfg.kernel == "prefill" else 0)


def _check_space(space: str) -> None:
    if space not in SPACES:
        raise ValueError(f"space must be one of {sorted(SPACES)}, got {space!r}")


def block_module(cfg: KernelConfig, bucket: Bucket, wl, space: str = "generic"):
    """The block-form kernel of ``bucket`` that ``space`` schedules, as the IRModule MetaSchedule tunes
    (entry ``main``)."""
    _check_space(space)
    if cfg.kernel == "prefill":
        func = build_prefill_blocks(cfg, bucket.batch, bucket.pages, wl.num_pages, wl.q_lens[0], scale=wl.scale)
    else:
        func = build_decode_generic(cfg, bucket.batch, bucket.pages, wl.num_pages, scale=wl.scale,
                                    weights=space == "paged")
    return tc.ir_module({ENTRY: func.with_attr("global_symbol", ENTRY)})


def _space_generator(cfg: KernelConfig, bucket: Bucket, target, space: str, wl):
    if space == "generic":
        return "post-order-apply"
    ms = tc.meta_schedule()
    if target_kind(target) == "cuda":
        fn = decode_space_cuda(cfg, bucket.pages)
    elif cfg.kernel == "prefill":
        fn = prefill_space(cfg, wl.q_lens[0], cpu_vector_lanes(target))
    else:
        fn = decode_space(cfg, bucket.pages, cpu_vector_lanes(target))
    # No schedule rules (the function is the whole space); the target's postprocessors (which apply the sampled
    # unroll) and mutators (which move the sampled tile sizes and unroll between generations).
    return ms.space_generator.ScheduleFn(fn, sch_rules=[])


def _cost_model(trials: int) -> str:
    """MetaSchedule's XGBoost cost model when the run is long enough to fit it and xgboost is installed (it is
    optional: a GPU machine may lack it), else random ranking."""
    if trials < 8:
        return "random"
    try:
        import xgboost  # noqa: F401, PLC0415
    except ImportError:
        return "random"
    return "xgb"


def check_request(cfg: KernelConfig, target, opts, space: str) -> None:
    """Raise ``TuneError`` when ``space`` cannot tune ``cfg`` on ``target`` with ``opts`` (before any work)."""
    _check_space(space)
    if cfg.kernel != "decode" and space == "generic":
        raise TuneError("--space generic: only the decode kernel has a generic block-form version")
    if cfg.kernel == "prefill" and opts.q_len <= 0:
        raise TuneError(f"--space {space} --kernel prefill: give --q-len N (query rows per sequence; the block "
                        "form has the same number for every sequence)")
    if target_kind(target) == "cuda":
        if space != "paged" or cfg.kernel != "decode":
            raise TuneError(f"--space {space} --kernel {cfg.kernel}: on CUDA targets only --space paged, for "
                            "decode")
    elif opts.rpc_tracker is not None:
        raise TuneError(f"--space {space}: CPU targets are tuned on this machine only (no --rpc-tracker)")


def tune_block_form(cfg: KernelConfig, target, bucket: Bucket, work_dir: Path, *, trials: int, opts,
                    space: str = "generic") -> dict:
    """Tune the block-form kernel of ``bucket`` over ``space`` (``generic`` or ``paged``) with MetaSchedule's
    evolutionary search; returns the summary written.

    ``opts``: the :class:`~tvm_paged.tuning.search.TuneOptions` of the run (pool, tables, repeat, seed).
    """
    check_request(cfg, target, opts, space)
    device_type = check_device(target, opts)  # a CUDA target needs this machine's GPU or an RPC tracker
    ms = tc.meta_schedule()
    wl = _workload(cfg, bucket, opts, device_type)
    if len(set(wl.q_lens)) > 1:
        raise TuneError(f"--q-len {opts.q_len}: longer than bucket {bucket.name}'s shortest sequence")
    mod = block_module(cfg, bucket, wl, space)
    ms_dir = Path(work_dir) / space / bucket.name / "ms"
    ms_dir.mkdir(parents=True, exist_ok=True)
    inputs = PagedInputs(kernel="prefill_blocks" if cfg.kernel == "prefill" else "decode_generic",
                         page_size=cfg.page_size, seq_lens=wl.seq_lens,
                         tables=wl.tables, seed=opts.seed)
    # The bar shows trials done and the best rate so far (GB/s of K+V for decode, GFLOP/s for prefill); with it,
    # MetaSchedule's own console log (a task table per round) is dropped: its log files keep it.
    bar = tqdm(total=trials, desc=f"{cfg.name} {bucket.name} {space}", unit="trial", disable=not opts.progress,
               file=sys.stderr)
    best = [math.inf]

    def on_results(run_secs: list[list[float]]) -> None:
        for secs in run_secs:
            m = median_secs(secs)  # None for a failed trial
            if m:
                best[0] = min(best[0], m)
        if math.isfinite(best[0]):
            rate = (f"{wl.gflops(best[0]):.1f} GFLOP/s" if cfg.kernel == "prefill"
                    else f"{wl.gbps(best[0]):.2f} GB/s")
            bar.set_postfix_str(f"best {rate}", refresh=False)
        bar.update(len(run_secs))

    t0 = time.perf_counter()
    with meta_schedule_logging(quiet=opts.progress):
        runner = make_runner(wl, device_type, opts, inputs)
        if device_type == "cuda" and not tc.cuda_codegen_available():
            # No CUDA driver here (measured through RPC): device code built by nvcc in a child process.
            f_build, f_export = build_cuda_library, pass_path
        else:
            f_build, f_export = build_module, None
        builder = ms.builder.LocalBuilder(max_workers=tc.allowed_cores(), timeout_sec=opts.build_timeout,
                                          f_build=f_build, f_export=f_export)
        try:
            database = ms.tune_tir(mod, with_host(target), str(ms_dir), max_trials_global=trials,
                                   num_trials_per_iter=max(1, min(trials, opts.per_round * 2)), builder=builder,
                                   runner=runner, cost_model=_cost_model(trials),
                                   strategy=evolutionary_search(opts.population),
                                   space=_space_generator(cfg, bucket, target, space, wl),
                                   measure_callbacks=measure_callbacks(on_results),
                                   num_tuning_cores=tc.allowed_cores(), seed=opts.seed)
        finally:
            bar.close()
            close_runner(runner)
    wall = time.perf_counter() - t0
    records = database.get_all_tuning_records()
    timed = [(median_secs([float(s) for s in r.run_secs]), r) for r in records if r.run_secs]
    timed = [(s, r) for s, r in timed if s]
    summary = {
        "config": cfg.name,
        "bucket": bucket.name,
        "space": SPACES[space],
        "trials": len(records),
        "succeeded": len(timed),
        # Failed builds, runs, and variants whose output did not match the float64 reference (OutputCheck).
        "failed": len(records) - len(timed),
        "wall_s": round(wall, 1),
        "kv_bytes": wl.kv_bytes,
        "gbps": None,
        "gflops": None,
        "ms": None,
        "trace": None,
    }
    if timed:
        secs, best = min(timed, key=lambda x: x[0])
        summary.update(gbps=round(wl.gbps(secs), 4), gflops=round(wl.gflops(secs), 2),
                       ms=round(secs * 1e3, 6), trace=str(best.trace))
        if space == "paged":
            summary["decisions"] = decisions(best.trace, "decode_cuda" if device_type == "cuda" else cfg.kernel)
    (ms_dir.parent / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def best_block_kernel(cfg: KernelConfig, target, bucket: Bucket, work_dir: Path, *, opts, space: str = "generic"):
    """The best schedule ``space``'s search stored for ``bucket``, applied and compiled (``None`` if none):
    an executable whose ``main`` takes (q, k_cache, v_cache, block_table, seq_lens, out)."""
    _check_space(space)
    ms = tc.meta_schedule()
    ms_dir = Path(work_dir) / space / bucket.name / "ms"
    if not (ms_dir / "database_tuning_record.json").exists():
        return None
    mod = block_module(cfg, bucket, _workload(cfg, bucket, opts), space)
    database = ms.database.JSONDatabase(work_dir=str(ms_dir))
    sch = ms.tir_integration.compile_tir(database, mod, with_host(target))
    if sch is None:
        return None
    return tc.compile_module(sch.mod, with_host(target))


def discard_database(work_dir: Path, bucket: Bucket, space: str = "generic") -> None:
    """Remove MetaSchedule's database and logs of ``bucket``'s run over ``space``, keeping ``summary.json``."""
    _check_space(space)
    shutil.rmtree(Path(work_dir) / space / bucket.name / "ms", ignore_errors=True)


__all__ = ["SPACES", "check_request", "block_module", "tune_block_form", "best_block_kernel", "discard_database"]
