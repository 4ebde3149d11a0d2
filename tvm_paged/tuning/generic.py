"""MetaSchedule's generic design space on the block-form decode kernel, for comparison with the knob space.

``tvm-paged tune --space generic`` runs ``tune_tir`` with MetaSchedule's own space generator (``post-order-apply``
over the target's default schedule rules) and evolutionary search on :func:`build_decode_generic` specialized to a
bucket, measured by the same runner as the knob space (valid fragmented page tables, rotating tables). Nothing it
finds is used at run time: the point is the number next to the knob space's on the same bucket.

Per bucket it keeps ``summary.json`` (best GB/s, trials, failed trials including wrong outputs, the best trace
as text) under ``<work_dir>/generic/<bucket>/``; MetaSchedule's own database and logs stay in that folder's
``ms/``, which is not meant to be committed (a few hundred KB of traces per run).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .. import tvm_compat as tc
from ..build import target_kind, with_host
from ..config import KernelConfig
from ..kernels.decode_generic import build_decode_generic
from .records import median_secs
from .workload import ENTRY, Bucket, PagedInputs, build_module, make_workload


def _workload(cfg: KernelConfig, bucket: Bucket, opts):
    """The bucket's lengths and pool, as the knob space's runs measure it."""
    return make_workload(cfg, bucket, device_kind="cpu", pool_mb=opts.pool_mb, pool_factor=opts.pool_factor,
                         tables=opts.tables, seed=opts.seed)


def generic_module(cfg: KernelConfig, bucket: Bucket, wl):
    """The block-form kernel of ``bucket`` as the IRModule MetaSchedule tunes (entry ``main``)."""
    func = build_decode_generic(cfg, bucket.batch, bucket.pages, wl.num_pages, scale=wl.scale)
    return tc.ir_module({ENTRY: func.with_attr("global_symbol", ENTRY)})


def tune_generic(cfg: KernelConfig, target, bucket: Bucket, work_dir: Path, *, trials: int, opts) -> dict:
    """Tune the block-form decode of ``bucket`` over MetaSchedule's generic space; returns the summary written.

    ``opts``: the :class:`~tvm_paged.tuning.search.TuneOptions` of the run (pool, tables, repeat, seed).
    """
    from .search import TuneError, _close, _runner  # noqa: PLC0415

    if cfg.kernel != "decode":
        raise TuneError("--space generic: only the decode kernel has a block-form version")
    if target_kind(target) != "cpu" or opts.rpc_tracker is not None:
        raise TuneError("--space generic: local CPU targets only")
    ms = tc.meta_schedule()
    wl = _workload(cfg, bucket, opts)
    mod = generic_module(cfg, bucket, wl)
    ms_dir = Path(work_dir) / "generic" / bucket.name / "ms"
    ms_dir.mkdir(parents=True, exist_ok=True)
    inputs = PagedInputs(kernel="decode_generic", page_size=cfg.page_size, seq_lens=wl.seq_lens,
                         tables=opts.tables, seed=opts.seed)
    runner = _runner(wl, "cpu", opts, inputs)
    builder = ms.builder.LocalBuilder(max_workers=tc.allowed_cores(), timeout_sec=opts.build_timeout,
                                      f_build=build_module)
    t0 = time.perf_counter()
    try:
        database = ms.tune_tir(mod, with_host(target), str(ms_dir), max_trials_global=trials,
                               num_trials_per_iter=max(1, min(trials, opts.per_round * 2)), builder=builder,
                               runner=runner, cost_model="xgb" if trials >= 8 else "random",
                               strategy="evolutionary", num_tuning_cores=tc.allowed_cores(), seed=opts.seed)
    finally:
        _close(runner)
    wall = time.perf_counter() - t0
    records = database.get_all_tuning_records()
    timed = [(median_secs([float(s) for s in r.run_secs]), r) for r in records if r.run_secs]
    timed = [(s, r) for s, r in timed if s]
    summary = {
        "config": cfg.name,
        "bucket": bucket.name,
        "space": "MetaSchedule post-order-apply, default rules for the target",
        "trials": len(records),
        "succeeded": len(timed),
        # Failed builds, runs, and variants whose output did not match the float64 reference (OutputCheck).
        "failed": len(records) - len(timed),
        "wall_s": round(wall, 1),
        "kv_bytes": wl.kv_bytes,
        "gbps": None,
        "ms": None,
        "trace": None,
    }
    if timed:
        secs, best = min(timed, key=lambda x: x[0])
        summary.update(gbps=round(wl.gbps(secs), 4), ms=round(secs * 1e3, 6), trace=str(best.trace))
    (ms_dir.parent / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def best_generic_kernel(cfg: KernelConfig, target, bucket: Bucket, work_dir: Path, *, opts):
    """The best schedule the generic search stored for ``bucket``, applied and compiled (``None`` if none):
    an executable whose ``main`` takes (q, k_cache, v_cache, block_table, seq_lens, out)."""
    ms = tc.meta_schedule()
    ms_dir = Path(work_dir) / "generic" / bucket.name / "ms"
    if not (ms_dir / "database_tuning_record.json").exists():
        return None
    mod = generic_module(cfg, bucket, _workload(cfg, bucket, opts))
    database = ms.database.JSONDatabase(work_dir=str(ms_dir))
    sch = ms.tir_integration.compile_tir(database, mod, with_host(target))
    if sch is None:
        return None
    return tc.compile_module(sch.mod, with_host(target))


def discard_database(work_dir: Path, bucket: Bucket) -> None:
    """Remove MetaSchedule's database and logs of ``bucket``'s generic run, keeping ``summary.json``."""
    shutil.rmtree(Path(work_dir) / "generic" / bucket.name / "ms", ignore_errors=True)


__all__ = ["generic_module", "tune_generic", "best_generic_kernel", "discard_database"]
