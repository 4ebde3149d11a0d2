"""``tvm-paged tune``: tune a kernel's builder knobs for a target; write its log and its schedule file.

The schedule goes to the user's folder (``~/.cache/tvm_paged/schedules/<target_key>/``, or
``TVM_PAGED_SCHEDULES_DIR``), which every later build on this machine searches before the schedules shipped with
the package; the log to ``~/.cache/tvm_paged/tuning_logs/``. ``--schedules-dir schedules --work-dir
tuning_logs/<target_key>/<config>`` from a checkout adds them to the project instead.

Example (local CPU, two buckets, 24 trials each, resumable)::

    tvm-paged tune --target local --kernel decode --num-qo-heads 32 --num-kv-heads 8 --head-dim 128 \\
        --page-size 16 --dtype float16 --buckets 8x64,1x1024 --trials 24

A variant configuration is tuned by naming it: ``--kv-dtype float8_e5m2`` (an 8-bit cache) and/or ``--variants w+cap``
(one combination of attention variants: tags ``w``, ``cap``, ``alibi``, ``sink`` joined by ``+``). Its schedule file
is ``<target_key>/<config name>.json`` (``decode_e5m2_f16_h32x8_d128_p16_w_cap.json``); a variant with no
file of its own is built with its plain configuration's knobs (see :mod:`tvm_paged.tuned_knobs`).

A CUDA target is measured on a GPU: on this machine if it has one, else through an RPC tracker
(``--rpc-tracker HOST:PORT --rpc-key KEY``). The library itself lives in :mod:`tvm_paged.tuning`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import tuned_knobs
from .cli import VARIANTS_HELP, output_folder, variant_flags
from .config import FP8_DTYPES, KernelConfig
from .targets import resolve_target

# The tuning package (tvm_paged.tuning: MetaSchedule's glue, the search, its workers' pieces) is imported in the
# functions below, only when `tvm-paged tune` runs: `tvm-paged --help` and the other subcommands import this module
# to list its arguments and never need it.


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="local",
                   help="'local' (this CPU), a TVM tag (nvidia/nvidia-h100) or a JSON target dict (default: local)")
    p.add_argument("--kernel", choices=("decode", "prefill"), default="decode")
    p.add_argument("--num-qo-heads", type=int, default=32)
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float16")
    p.add_argument("--kv-dtype", choices=tuple(FP8_DTYPES), default=None,
                   help="tune the kernel for 8-bit caches of this dtype (default: caches in --dtype)")
    p.add_argument("--variants", "--variant", default="", metavar="COMBO", dest="variants",
                   help=f"tune the kernel of this one attention-variant combination (default: none); {VARIANTS_HELP}. "
                        "The measured calls use a window of half the bucket's context, a soft-cap of 30, the "
                        "standard ALiBi slopes, zero sinks")
    p.add_argument("--buckets", default="8x64,1x1024",
                   help="workload buckets BATCHxPAGES (max pages per sequence), comma separated (default: 8x64,1x1024)")
    p.add_argument("--trials", type=int, default=16,
                   help="trials per bucket in total, counting those already in the log (default: 16)")
    p.add_argument("--per-round", type=int, default=8, help="variants built together per round (default: 8)")
    p.add_argument("--strategy", choices=("xgb", "mutate", "random"), default="xgb",
                   help="after the first random points: XGBoost cost model over knob features (default), "
                        "mutate-the-best, or random only")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="tuning log folder (default: ~/.cache/tvm_paged/tuning_logs/<target_key>/<config name>; "
                        "tuning_logs/<target_key>/<config name> to add it to the project)")
    p.add_argument("--schedules-dir", type=Path, default=None,
                   help="where to write the schedule file (default: $TVM_PAGED_SCHEDULES_DIR, else "
                        "~/.cache/tvm_paged/schedules, which lookups search before the schedules shipped with the "
                        "package; schedules/ to add it to the project)")
    p.add_argument("--rpc-tracker", default=None, metavar="HOST:PORT", help="measure through this RPC tracker")
    p.add_argument("--rpc-key", default=None, help="device key registered with the RPC tracker")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pool-mb", type=float, default=None,
                   help="cap on the K+V page pool the page tables are shuffled over, MiB (default: 4x the "
                        "last-level cache the OS reports, and enough rotating tables to touch it all; 512 over RPC)"),
    p.add_argument("--repeat", type=int, default=5, help="timings per trial (default: 5)")
    p.add_argument("--min-repeat-ms", type=int, default=100, help="minimum length of one timing (default: 100)")
    p.add_argument("--build-timeout", type=float, default=300, help="seconds one variant may take to build")
    p.add_argument("--q-len", type=int, default=0, help="prefill: query rows per sequence, 0 = whole sequence")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--population", type=int, default=512,
                   help="--space paged|generic: candidates MetaSchedule's evolutionary search keeps per round "
                        "(default: 512, MetaSchedule's; smaller rounds start measuring sooner on a slow host)")
    p.add_argument("--space", choices=("knobs", "paged", "generic"), default="knobs",
                   help="knobs (default): the kernel builders' knob space, writes schedules/; paged: "
                        "MetaSchedule over the paged-attention ScheduleFn space of a block-form kernel (decode, "
                        "or prefill with --q-len); generic: MetaSchedule's generic space on the block-form "
                        "decode (local CPU). paged also runs on CUDA targets (decode, thread-bound). paged and "
                        "generic are for comparison only (each bucket's best rate is printed and kept in "
                        "<work-dir>/<space>/)")


def _check_numbers(args: argparse.Namespace) -> None:
    """The numeric options in range (ValueError naming the option), before any build."""
    for option, value, lowest in (("--trials", args.trials, 1), ("--per-round", args.per_round, 1),
                                  ("--repeat", args.repeat, 1), ("--min-repeat-ms", args.min_repeat_ms, 0),
                                  ("--q-len", args.q_len, 0), ("--population", args.population, 2)):
        if value < lowest:
            raise ValueError(f"{option}: must be >= {lowest}, got {value}")
    for option, value in (("--pool-mb", args.pool_mb), ("--build-timeout", args.build_timeout)):
        if value is not None and not value > 0:
            raise ValueError(f"{option}: must be > 0, got {value}")


def _tracker(text: str | None) -> tuple[str, int] | None:
    if not text:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--rpc-tracker: expected HOST:PORT, got {text!r}")
    return host, int(port)


def tune_config(args: argparse.Namespace) -> KernelConfig:
    """The one configuration a ``tvm-paged tune`` command names (its variants and cache dtype included)."""
    combo = getattr(args, "variants", "") or ""
    if "," in combo:
        raise ValueError(f"--variants: tune tunes one configuration: give one combination (tags joined by '+'), "
                         f"got {combo!r}")
    return KernelConfig(args.kernel, args.dtype, args.num_qo_heads, args.num_kv_heads, args.head_dim,
                        args.page_size, getattr(args, "kv_dtype", None), **variant_flags(combo))


def run(args: argparse.Namespace) -> int:
    from .tuning.search import TuneError, TuneOptions, format_summary, tune  # noqa: PLC0415
    from .tuning.workload import parse_buckets  # noqa: PLC0415

    try:
        target = resolve_target(args.target)
        cfg = tune_config(args)
        buckets = parse_buckets(args.buckets)
        _check_numbers(args)
        for option, folder in (("--work-dir", args.work_dir), ("--schedules-dir", args.schedules_dir)):
            if folder is not None:
                output_folder(folder, option)
        opts = TuneOptions(
            trials=args.trials, per_round=args.per_round, seed=args.seed, strategy=args.strategy,
            work_dir=args.work_dir, schedules_root=args.schedules_dir, rpc_tracker=_tracker(args.rpc_tracker),
            rpc_key=args.rpc_key, pool_mb=args.pool_mb, repeat=args.repeat, min_repeat_ms=args.min_repeat_ms,
            q_len=args.q_len, progress=not args.no_progress, build_timeout=args.build_timeout,
            population=args.population,
        )
    except ValueError as exc:
        print(f"tvm-paged tune: {exc}", file=sys.stderr)
        return 2
    try:
        if args.space != "knobs":
            return _run_block_form(cfg, target, buckets, opts, args.target, args.space)
        summary = tune(cfg, target, buckets, opts)
    except TuneError as exc:
        print(f"tvm-paged tune: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tvm-paged tune: interrupted; every measured trial is in the log, run again to continue",
              file=sys.stderr)
        return 130
    print(f"{cfg.name} on {args.target}:")
    print(format_summary(summary))
    return 0


def _run_block_form(cfg, target, buckets, opts, target_name: str, space_name: str) -> int:
    """``--space paged|generic``: tune each bucket's block-form kernel with MetaSchedule over that space and print
    it beside the knob space's best on the same bucket (from the knob-space log, when one exists). Decode is
    reported in GB/s of K+V, prefill in GFLOP/s."""
    from .tuning.block_spaces import SPACES, check_request, discard_database, tune_block_form  # noqa: PLC0415
    from .tuning.records import TuningLog  # noqa: PLC0415
    from .tuning.search import summarize, work_dir_for  # noqa: PLC0415
    from .tuning.search import TuneError  # noqa: PLC0415
    from .tuning.space import KnobSpace  # noqa: PLC0415

    if not cfg.is_plain:
        raise TuneError(f"--space {space_name} tunes the plain block-form kernels only: {cfg.name} has variants or "
                        "an 8-bit cache (tune it with --space knobs)")
    check_request(cfg, target, opts, space_name)
    work_dir = work_dir_for(cfg, target, opts)
    knob_best = {}
    if (work_dir / "trials.jsonl").exists():
        space = KnobSpace(tuned_knobs.knob_space(cfg, target))
        for b in summarize(cfg, target, TuningLog(work_dir), space, opts):
            knob_best[f"{b['batch']}x{b['max_pages']}"] = b
    print(f"{cfg.name} on {target_name}, MetaSchedule's search over --space {space_name} ({SPACES[space_name]}):")
    for bucket in buckets:
        s = tune_block_form(cfg, target, bucket, work_dir, trials=opts.trials, opts=opts, space=space_name)
        discard_database(work_dir, bucket, space_name)
        k = knob_best.get(bucket.name)
        if cfg.kernel == "prefill":
            mine = f"; knob space best {k['gflops']:.1f} GFLOP/s" if k else ""
            best = f"{s['gflops']:.1f} GFLOP/s ({s['ms']:.4g} ms)" if s["gflops"] else "no trial ran"
        else:
            mine = f"; knob space best {k['gbps']:.2f} GB/s, default {k['default_gbps']} GB/s" if k else ""
            best = f"{s['gbps']:.2f} GB/s ({s['ms']:.4g} ms)" if s["gbps"] else "no trial ran"
        print(f"  {bucket.name}: {best}, {s['succeeded']}/{s['trials']} trials in {s['wall_s']:.0f} s{mine}")
    print(f"  summaries: {work_dir / space_name}")
    return 0
