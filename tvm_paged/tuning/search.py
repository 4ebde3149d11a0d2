"""The tuning loop: per bucket, propose knob dicts, build them with MetaSchedule's ``LocalBuilder``, measure them
with its ``LocalRunner`` (or ``RPCRunner``) on valid paged inputs, commit every trial, then write the schedule file.

Resumable: a run first reads the side table and counts the trials already measured for each bucket on the current
kernel (same workload hash, knobs still in the space); ``trials`` is the total per bucket, so a second run with a
larger ``trials`` continues where the first stopped and never measures a knob dict twice.

A bucket is decided by a closing runoff of the default and the search's best three, timed again in one stretch
(a shared machine's memory rate drifts over minutes, so timings from far apart in the search do not compare); on
a local CPU each trial's row also records the machine's read rate of its moment (``roof_gbps``).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .. import tuned_knobs
from .. import tvm_compat as tc
from ..config import KernelConfig
from ..kernels import build_kernel
from ..targets import resolve_target, target_key, target_kind, with_host
from .measure import OutputCheck, PagedInputs, ReadRoof, RotatingTimer
from .records import TuningLog, default_root, median_secs, workload_hash
from .space import KnobSpace, Proposer, knob_key
from .workload import Bucket, build_cuda_library, build_module, make_workload, pass_path


# A tuned point replaces the default only when it measured at least this much faster: timings of one knob dict
# move by a few percent between trials on a shared machine, and a noise "win" shipped instead of the default was
# seen to lose in the benchmark.
MIN_GAIN = 0.03
# Non-default points timed again against the default at the end of a bucket's search (the "runoff").
RUNOFF_CONTENDERS = 3


class TuneError(RuntimeError):
    """A tuning run that cannot start (no device for the target, bad arguments)."""


@dataclass
class TuneOptions:
    """How to tune; see ``tvm-paged tune --help`` for each field."""

    trials: int = 16
    per_round: int = 8
    seed: int = 0
    strategy: str = "xgb"
    work_dir: Path | None = None  # default: records.default_root()/<target_key>/<cfg.name>
    schedules_root: Path | None = None  # default: tuned_knobs.user_dir()
    rpc_tracker: tuple[str, int] | None = None
    rpc_key: str | None = None
    pool_mb: float | None = None  # None: DRAM-honest for this machine (see make_workload); 512 over RPC
    pool_factor: int = 4
    tables: int = 2
    repeat: int = 5
    min_repeat_ms: int = 100
    q_len: int = 0
    build_timeout: float = 300
    run_timeout: float = 120
    progress: bool = True
    population: int = 512  # MetaSchedule's evolutionary population (--space paged / generic)


def pool_mb(opts: TuneOptions) -> float | None:
    """The workload's pool cap: the user's, else DRAM-honest sizing locally and 512 MiB over RPC (a remote
    device's cache is not this machine's)."""
    if opts.pool_mb is not None or opts.rpc_tracker is None:
        return opts.pool_mb
    return 512


def work_dir_for(cfg: KernelConfig, target, opts: TuneOptions) -> Path:
    if opts.work_dir is not None:
        return Path(opts.work_dir)
    return default_root() / target_key(target) / cfg.name


def check_device(target, opts: TuneOptions) -> str:
    """The runtime device type measurements run on; refuses a CUDA target with no GPU here and no RPC."""
    kind = target_kind(target)
    if opts.rpc_tracker is not None:
        if not opts.rpc_key:
            raise TuneError("--rpc-tracker needs --rpc-key (the key the RPC server registered with)")
        return "cuda" if kind == "cuda" else "cpu"
    if kind == "cuda":
        if not tc.cuda_device(0).exist:
            raise TuneError("target is CUDA but this machine has no local CUDA device: tune it on a machine with "
                            "the GPU, or through --rpc-tracker HOST:PORT --rpc-key KEY")
        return "cuda"
    return "cpu"


def make_runner(workload, device_type: str, opts: TuneOptions, inputs=None):
    """MetaSchedule's runner for ``workload``'s valid inputs (``inputs``: another argument maker, e.g. for the
    block-form kernel). A local runner also checks each variant's output against the float64 reference."""
    ms = tc.meta_schedule()
    if inputs is None:  # the shipped kernel of the workload's config (its variants' arguments and options)
        inputs, check = PagedInputs.of(workload), OutputCheck.of(workload)
    else:
        check = OutputCheck(inputs.kernel, workload.scale)
    evaluator = ms.runner.EvaluatorConfig(number=1, repeat=opts.repeat, min_repeat_ms=opts.min_repeat_ms)
    if opts.rpc_tracker is not None:
        host, port = opts.rpc_tracker
        config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=opts.rpc_key,
                                     session_timeout_sec=int(opts.run_timeout))
        # Over RPC the timing loop must run remotely: MetaSchedule's time_evaluator, one table after another.
        return ms.runner.RPCRunner(config, evaluator, alloc_repeat=workload.tables, f_alloc_argument=inputs,
                                   max_workers=1)
    return ms.runner.LocalRunner(timeout_sec=opts.run_timeout, evaluator_config=evaluator,
                                 alloc_repeat=workload.tables, f_alloc_argument=inputs,
                                 f_run_evaluator=RotatingTimer(check))


def close_runner(runner) -> None:
    """Shut down a runner's worker pool (a local runner's worker process)."""
    pool = getattr(runner, "pool", None)
    if pool is not None:
        try:
            pool.shutdown()
        except Exception:  # noqa: BLE001  (best effort: a worker that already died)
            pass


def start_rpc_tracker(host: str = "127.0.0.1", port: int = 9190, port_end: int = 9199, silent: bool = True):
    """Start TVM's RPC tracker in a subprocess (``.host``, ``.port``, ``.terminate()``), what ``--rpc-tracker``
    points at; needs ``tornado``."""
    return tc.Tracker(host, port=port, port_end=port_end, silent=silent)


def start_rpc_server(tracker_host: str, tracker_port: int, key: str, host: str = "127.0.0.1", port: int = 9091,
                     port_end: int = 9199, silent: bool = True):
    """Start TVM's RPC server in a subprocess, registered with a tracker under ``key`` (``--rpc-key``); the
    device it serves is this machine's (``.terminate()``)."""
    return tc.Server(host, port=port, port_end=port_end, tracker_addr=(tracker_host, tracker_port), key=key,
                     silent=silent)


def _short(msg: str | None) -> str | None:
    if not msg:
        return None
    lines = [ln.strip() for ln in str(msg).strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else str(msg)[:300]


def tune(cfg: KernelConfig, target, buckets: list[Bucket], opts: TuneOptions | None = None) -> dict:
    """Tune ``cfg`` on ``target`` for ``buckets``; returns the summary written to the schedule file
    (``{"schedule": path or None, "buckets": [...], "work_dir": ...}``). A KeyboardInterrupt stops the run after
    the last committed trial; the schedule file is still written from what was measured."""
    opts = opts or TuneOptions()
    if opts.trials < 1:
        raise TuneError("--trials must be at least 1")
    device_type = check_device(target, opts)
    space = KnobSpace(tuned_knobs.knob_space(cfg, target))
    log = TuningLog(work_dir_for(cfg, target, opts))
    ms = tc.meta_schedule()
    if target_kind(target) == "cuda" and not tc.cuda_codegen_available():
        # No CUDA driver here: each variant is built in a child process with a libcuda stub (device binaries).
        build_target, f_build, f_export = target, build_cuda_library, pass_path
    else:
        build_target, f_build, f_export = with_host(target), build_module, None
    builder = ms.builder.LocalBuilder(max_workers=max(1, min(tc.allowed_cores(), opts.per_round)),
                                      timeout_sec=opts.build_timeout, f_build=f_build, f_export=f_export)
    rows = log.rows()
    total = opts.trials * len(buckets)
    bar = tqdm(total=total, desc=cfg.name, unit="trial", disable=not opts.progress, file=sys.stderr)
    try:
        for bucket in buckets:
            _tune_bucket(cfg, target, build_target, bucket, space, log, rows, builder, device_type, opts, bar)
    finally:
        bar.close()
        summary = write_schedule(cfg, target, log, space, opts)
        log.compact()
    return summary


def _tune_bucket(cfg, target, build_target, bucket: Bucket, space: KnobSpace, log: TuningLog, rows: list[dict],
                 builder, device_type: str, opts: TuneOptions, bar) -> None:
    ms = tc.meta_schedule()
    wl = make_workload(cfg, bucket, device_kind=device_type, pool_mb=pool_mb(opts), pool_factor=opts.pool_factor,
                       tables=opts.tables, seed=opts.seed, q_len=opts.q_len)
    default_func = build_kernel(cfg, target, **space.default)
    whash = workload_hash(wl.module(default_func))
    shaped = wl.shaped(default_func)  # every variant has the same signature: argument shapes for the runner
    args_info = ms.arg_info.ArgInfo.from_entry_func(shaped)
    db_workload = log.commit_workload(wl.record_module(shaped, whash))
    measured: dict[int, float | None] = {}
    best = None
    for row in rows:
        if row.get("bucket") != bucket.name or row.get("workload") != whash:
            continue
        idx = space.index(row.get("knobs"))
        if idx is not None and not row.get("recheck"):
            measured[idx] = median_secs(row.get("run_secs"))
    for s in measured.values():
        if s is not None:
            best = max(best or 0.0, wl.gbps(s))
    trials = min(opts.trials, space.size)
    bar.update(min(len(measured), opts.trials))
    if opts.trials > space.size and bar.total:
        bar.total -= opts.trials - space.size  # a small space is exhausted early
        bar.refresh()
    if len(measured) >= trials:
        return
    proposer = Proposer(space, opts.strategy, seed=[opts.seed, bucket.batch, bucket.pages, len(measured)])
    # Starting the runner's worker (a process that imports TVM) overlaps the first round's builds.
    starter = ThreadPoolExecutor(max_workers=1)
    pending = starter.submit(make_runner, wl, device_type, opts)
    state = {"runner": None, "best": best}
    # A local CPU trial is timed beside the read roof of its moment (``roof_gbps`` in its row): a record of the
    # machine's state, not a correction: dividing by it would add noise, since single 20 ms reads of a shared
    # VM's memory swung from 15 to 54 GB/s within one bucket's trials while the kernels' rates moved by 10-20%.
    roof = ReadRoof(wl.pool_bytes) if device_type == "cpu" and opts.rpc_tracker is None else None

    def measure(picks: list[int], recheck: bool = False, warmup: int = 0) -> None:
        """Build ``picks`` together, then measure them one by one, committing each trial as it is measured; the
        first ``warmup`` timings of a recheck are flagged as such (timed, then ignored by the summary)."""
        mods, inputs = [], []
        for idx in picks:
            mod = wl.module(build_kernel(cfg, target, **space.knobs(idx)))
            mods.append(mod)
            inputs.append(ms.builder.BuilderInput(mod, build_target))
        t_build = time.perf_counter()
        built = builder.build(inputs)
        build_s = (time.perf_counter() - t_build) / len(picks)  # wall per variant, pool start included
        for pos, (idx, mod, res) in enumerate(zip(picks, mods, built)):
            run_secs, error, roof_gbps = None, None, None
            t_run = time.perf_counter()
            if res.error_msg:
                error = "build: " + (_short(res.error_msg) or "")
            else:
                try:
                    if state["runner"] is None:
                        state["runner"] = pending.result()
                    roof_gbps = roof() if roof is not None else None
                    fut = state["runner"].run([ms.runner.RunnerInput(str(res.artifact_path), device_type,
                                                                     args_info)])[0]
                    out = fut.result()
                    if out.error_msg:
                        error = "run: " + (_short(out.error_msg) or "")
                    else:
                        run_secs = [float(s) for s in out.run_secs]
                finally:
                    shutil.rmtree(Path(str(res.artifact_path)).parent, ignore_errors=True)
            secs = median_secs(run_secs)
            if run_secs is not None and secs is None:
                error, run_secs = "run: no finite time", None
            row = {
                "roof_gbps": round(roof_gbps, 2) if roof_gbps else None,
                "bucket": bucket.name,
                "knobs": space.knobs(idx),
                "workload": whash,
                "trial": len(measured),
                "kv_bytes": wl.kv_bytes,
                "ms": round(secs * 1e3, 6) if secs else None,
                "gbps": round(wl.gbps(secs), 4) if secs else None,
                "error": error,
                "build_s": round(build_s, 2),
                "measure_s": round(time.perf_counter() - t_run, 2),
            }
            if recheck:
                row["recheck"] = True
                if pos < warmup:
                    row["warmup"] = True
            rows.append(log.commit(db_workload, shaped, target, row, run_secs))
            if not recheck:
                measured[idx] = secs
            if secs:
                state["best"] = max(state["best"] or 0.0, wl.gbps(secs))
            if not recheck:
                bar.update(1)
            best_now = state["best"]
            bar.set_postfix_str(f"{bucket.name} best {best_now:.2f} GB/s" if best_now else
                                f"{bucket.name} no success yet")

    try:
        while len(measured) < trials:
            picks = proposer.propose(measured, min(opts.per_round, trials - len(measured)))
            if not picks:
                break
            measure(picks)
        # The trials were timed at different moments of a run on a machine whose memory rate drifts by 10-30%
        # over minutes (the first trial also meets a cold worker), so a single lucky timing can outrank a
        # better point. The runoff times the default and the best few again in one stretch, in the order
        # A B C D D C B A, so every point's mean sits at the same moment and a linear drift cancels; the
        # summary decides from it (see ``runoff_rows``). The first timing after a round of builds read 7-16% low
        # here, so the runoff leads with a call of the last contender that the summary ignores.
        ok = {i: s for i, s in measured.items() if s}
        contenders = sorted((i for i in ok if i != 0), key=ok.get)[:RUNOFF_CONTENDERS]
        if 0 in ok and contenders:
            order = [0, *contenders]
            measure([contenders[-1], *order, *order[::-1]], recheck=True, warmup=1)
    finally:
        starter.shutdown(wait=True)
        runner = state["runner"]
        if runner is None and pending.done() and pending.exception() is None:
            runner = pending.result()
        close_runner(runner)


def summarize(cfg: KernelConfig, target, log: TuningLog, space: KnobSpace, opts: TuneOptions) -> list[dict]:
    """Per bucket measured on the current kernel: the best knobs, its GB/s, the default's GB/s, trial count."""
    out = []
    by_bucket: dict[str, list[dict]] = {}
    for row in log.rows():
        by_bucket.setdefault(str(row.get("bucket")), []).append(row)
    device_kind = "cuda" if target_kind(target) == "cuda" else "cpu"
    hashes: dict[str, str] = {}
    for name, rows in by_bucket.items():
        try:
            bucket = Bucket.parse(name)
        except ValueError:
            continue
        wl = make_workload(cfg, bucket, device_kind=device_kind, pool_mb=pool_mb(opts),
                           pool_factor=opts.pool_factor, tables=opts.tables, seed=opts.seed, q_len=opts.q_len)
        if name not in hashes:
            hashes[name] = workload_hash(wl.module(build_kernel(cfg, target, **space.default)))
        current = {}
        valid = [r for r in rows if r.get("workload") == hashes[name] and space.index(r.get("knobs")) is not None]
        for row in valid:
            current[knob_key(row["knobs"])] = row  # last measurement of a knob dict wins
        decided = runoff_rows(valid, space)
        if decided:  # the runoff's means: timings from one stretch of time
            current = decided
        ok = [r for r in current.values() if r.get("gbps")]
        if not ok:
            continue
        best = max(ok, key=lambda r: r["gbps"])
        default = current.get(knob_key(space.default))
        kept = bool(default and default.get("gbps") and best["gbps"] < default["gbps"] * (1 + MIN_GAIN))
        if kept:  # a win within the run-to-run noise is not a win: ship the default
            best = default
        out.append({
            "batch": bucket.batch,
            "max_pages": bucket.pages,
            "knobs": best["knobs"],
            "gbps": best["gbps"],
            "gflops": round(wl.gflops(best["ms"] / 1e3), 2),
            "ms": best["ms"],
            "default_gbps": default.get("gbps") if default else None,
            "trials": len({knob_key(r["knobs"]) for r in valid if not r.get("recheck")}),
            "default_kept": kept,
        })
    return out


def runoff_rows(rows: list[dict], space: KnobSpace) -> dict[str, dict]:
    """The last runoff of one bucket's ``rows`` (its re-timings: ``recheck`` rows sharing the highest ``trial``)
    as one row per knob dict with the mean GB/s and ms of its timings there; empty when there is none, or when
    it lacks a successful default timing (then the summary falls back to each knob dict's last timing)."""
    checks = [r for r in rows if r.get("recheck") and not r.get("warmup")]
    if not checks:
        return {}
    last = max(r.get("trial", 0) for r in checks)
    group: dict[str, list[dict]] = {}
    for r in checks:
        if r.get("trial", 0) == last:
            group.setdefault(knob_key(r["knobs"]), []).append(r)
    out = {}
    for key, rs in group.items():
        good = [r for r in rs if r.get("gbps") and r.get("ms")]
        if len(good) == len(rs):  # a contender that failed once is out
            out[key] = {**rs[-1], "gbps": round(sum(r["gbps"] for r in good) / len(good), 4),
                        "ms": round(sum(r["ms"] for r in good) / len(good), 6)}
    if knob_key(space.default) not in out:
        return {}
    return out


def write_schedule(cfg: KernelConfig, target, log: TuningLog, space: KnobSpace, opts: TuneOptions) -> dict:
    """Write ``schedules/<target_key>/<cfg.name>.json`` (+ ``.tvmscript``) from the log; returns the summary."""
    buckets = summarize(cfg, target, log, space, opts)
    summary = {"schedule": None, "buckets": buckets, "work_dir": str(log.dir)}
    if not buckets:
        return summary
    try:
        database = str(log.dir.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        database = str(log.dir)
    path = tuned_knobs.write(cfg, target, buckets, root=opts.schedules_root, database=database,
                           tvmscript=schedule_script(cfg, target, buckets))
    summary["schedule"] = str(path)
    return summary


def schedule_script(cfg: KernelConfig, target, buckets: list[dict]) -> str:
    """The ``.tvmscript`` written beside a schedule file: the kernel the build makes from the knobs of the bucket
    with the most K+V traffic, under a header giving that bucket's tuned and default rates."""
    top = max(buckets, key=lambda b: (b["batch"] * b["max_pages"], b["max_pages"]))
    func = build_kernel(cfg, target, **top["knobs"])
    header = (f"# Tuned {cfg.name} for {target_key(target)}: knobs {top['knobs']}, "
              f"{top['gbps']:.2f} GB/s of K+V at bucket {top['batch']}x{top['max_pages']} "
              f"(untuned default: {top['default_gbps'] if top['default_gbps'] is not None else 'n/a'} GB/s).\n"
              f"# Written by `tvm-paged tune`; the build recreates it from the knobs in the .json beside it.\n")
    return header + func.script()


def refresh_script(path: Path | str, write: bool = True) -> bool:
    """Bring the ``.tvmscript`` beside the schedule file ``path`` up to date with the current kernel code.

    The build recreates a kernel from the schedule's knobs, so after a change to a kernel's code the committed
    script no longer shows what runs. Returns True when the script was stale (and, with ``write``, rewritten);
    the schedule file itself is not touched."""
    path = Path(path)
    doc = json.loads(path.read_text())
    cfg = KernelConfig.from_name(doc["config"])
    target = resolve_target(doc["target"])
    text = schedule_script(cfg, target, doc["buckets"])
    script = path.with_suffix(tuned_knobs.SCRIPT_SUFFIX)
    stale = not script.exists() or script.read_text() != text
    if stale and write:
        tuned_knobs.write_text(script, text)
    return stale


def format_summary(summary: dict) -> str:
    lines = []
    for b in summary["buckets"]:
        d = b["default_gbps"]
        gain = f"{b['gbps'] / d:.2f}x" if d else "n/a"
        lines.append(f"  {b['batch']}x{b['max_pages']}: {b['gbps']:.2f} GB/s of K+V, {b['gflops']:.1f} GFLOP/s "
                     f"({b['ms']:.4g} ms, {b['trials']} trials), default {d if d is not None else 'n/a'} GB/s, "
                     f"{gain}; knobs {b['knobs']}" + (" (no point beat the default by 3%: default kept)"
                                                     if b.get("default_kept") else ""))
    if summary["schedule"]:
        lines.append(f"  schedule: {summary['schedule']}")
    lines.append(f"  log: {summary['work_dir']}")
    return "\n".join(lines)


__all__ = ["MIN_GAIN", "TuneError", "TuneOptions", "work_dir_for", "check_device", "make_runner", "close_runner",
           "start_rpc_tracker", "start_rpc_server", "tune", "summarize", "runoff_rows", "write_schedule",
           "format_summary"]
