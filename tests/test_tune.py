"""Tuning tests: knob-space runs and their resume, schedule files, measurement inputs, MetaSchedule's spaces.

A real (tiny) MetaSchedule tuning run and its resume, valid measurement inputs, applying a committed schedule
through paged_decode, corrupt or foreign schedule files, a CUDA target with no GPU, tuning through an RPC tracker
and server on loopback, and MetaSchedule's own search over the block-form spaces.

One small config (decode f32 h4x2 d64 p8, bucket 2x8) keeps each tuning run to a few builds; its e5m2 + window
variant is tuned once too, and the fallback of variants to the plain config's schedule file is checked. One module
(about 830 lines) on purpose: ``pytest tests/test_tune.py`` is the whole tuning check (the README names tests
in it), and its tests share that config, ``_opts``, the target fixture and one module-scoped tuning run.
"""

from __future__ import annotations

import argparse
import json
import random
import warnings
from pathlib import Path

import numpy as np
import pytest

import tvm_paged as tp
from tvm_paged import build, targets, reference, tuned_knobs
from tvm_paged import tvm_compat as tc
from tvm_paged.config import KernelConfig
from tvm_paged.kernels import build_kernel
from tvm_paged.tuning.measure import OutputCheck, PagedInputs, WrongOutput, fp8_valid_codes
from tvm_paged.tuning.records import TuningLog
from tvm_paged.tuning.search import TuneOptions, refresh_script, start_rpc_server, start_rpc_tracker, tune
from tvm_paged.tuning.space import KnobSpace, knob_key
from tvm_paged.tuning.workload import Bucket, make_workload, tensor_params
from paged_data import ATOL, LSE_ATOL, alibi_slopes, assert_close, make_pool, random_q

CFG = KernelConfig("decode", "float32", 4, 2, 64, 8)
BUCKET = Bucket(2, 8)
# A variant of CFG: 8-bit e5m2 caches and a sliding window.
VARIANT = CFG.with_variants(kv_dtype="float8_e5m2", window=True)
CLI_CFG = ["--num-qo-heads", "4", "--num-kv-heads", "2", "--head-dim", "64", "--page-size", "8", "--dtype", "float32"]


def _opts(tmp, **kw) -> TuneOptions:
    base = dict(trials=3, per_round=3, work_dir=tmp / "logs", schedules_root=tmp / "schedules", repeat=3,
                min_repeat_ms=10, pool_mb=4, progress=False)
    return TuneOptions(**{**base, **kw})


def _split_rechecks(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(search trials, closing re-measurements of the default and the best)."""
    return [r for r in rows if not r.get("recheck")], [r for r in rows if r.get("recheck")]


def _records(log: TuningLog) -> list[list[float]]:
    return [[float(s) for s in r.run_secs] for r in log.db.get_all_tuning_records()]


@pytest.fixture(scope="module")
def target():
    return targets.resolve_target("local")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, target):
    """One 3-trial tuning run into a temporary folder: (folder, summary)."""
    tmp = tmp_path_factory.mktemp("tune")
    return tmp, tune(CFG, target, [BUCKET], _opts(tmp))


@pytest.fixture()
def fresh_build(tmp_path, monkeypatch):
    """Kernels compiled afresh into a private disk cache, schedules read from ``tmp_path/schedules``."""
    monkeypatch.setenv("TVM_PAGED_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TVM_PAGED_SCHEDULES_DIR", str(tmp_path / "schedules"))
    build.clear_memory_cache()
    yield tmp_path / "schedules"
    build.clear_memory_cache()


def _decode_matches_reference(seed=0):
    seq_lens = [61, 9, 64, 1, 40]
    k, v, bt, sl = make_pool(seq_lens, page_size=CFG.page_size, num_kv_heads=CFG.num_kv_heads,
                             head_dim=CFG.head_dim, seed=seed)
    q = random_q(len(seq_lens), CFG.num_qo_heads, CFG.head_dim, seed=seed + 1)
    out, lse = tp.paged_decode(q, k, v, bt, sl, return_lse=True)
    ref_out, ref_lse = reference.decode(q, k, v, bt, sl)
    assert_close(out, ref_out, ATOL["float32"])
    assert_close(lse, ref_lse, LSE_ATOL["float32"], "lse")


# ------------------------------------------------------------------------------------------- tuning runs
def test_tune_measures_and_writes_schedule(tuned, target):
    tmp, summary = tuned
    log = TuningLog(tmp / "logs")
    records = _records(log)
    assert all(secs and all(np.isfinite(s) and 0 < s < 1 for s in secs) for secs in records)
    rows = log.rows()
    assert len(records) == len(rows) and all(r["error"] is None and r["gbps"] > 0 for r in rows)
    assert all(r["roof_gbps"] > 0 for r in rows)  # each timed beside the machine's read rate of its moment
    trials, checks = _split_rechecks(rows)
    assert len(trials) == 3
    space = KnobSpace(tuned_knobs.knob_space(CFG, target))
    assert trials[0]["knobs"] == space.default  # trial 0 is the untuned default
    assert len({knob_key(r["knobs"]) for r in trials}) == 3
    # The runoff: the default and the other trials, fastest first, timed again as A B C C B A.
    contenders = [r["knobs"] for r in sorted(trials[1:], key=lambda r: -r["gbps"])]
    order = [space.default, *contenders]
    assert [r["knobs"] for r in checks] == [contenders[-1], *order, *order[::-1]]
    assert [bool(r.get("warmup")) for r in checks] == [True] + [False] * 2 * len(order)
    checks = checks[1:]
    # The summary decides from the runoff's mean rates alone.
    mean = {knob_key(k): np.mean([r["gbps"] for r in checks if r["knobs"] == k]) for k in order}
    [b] = summary["buckets"]
    assert (b["batch"], b["max_pages"], b["trials"]) == (2, 8, 3)
    top_key = max(mean, key=mean.get)
    if b["default_kept"]:  # no point beat the default by more than the noise margin
        assert b["knobs"] == space.default and mean[top_key] < b["default_gbps"] * 1.03
    else:
        assert knob_key(b["knobs"]) == top_key and b["gbps"] == pytest.approx(mean[top_key], abs=1e-3)
    assert b["default_gbps"] == pytest.approx(mean[knob_key(space.default)], abs=1e-3)
    path = tmp / "schedules" / targets.target_key(target) / f"{CFG.name}.json"
    assert summary["schedule"] == str(path)
    doc = json.loads(path.read_text())
    assert doc["knobs"] == b["knobs"] and doc["config"] == CFG.name
    script = path.with_suffix(".tvmscript").read_text()
    assert "T.prim_func" in script and len(script) < 32_000 and path.stat().st_size < 4_000


def test_tune_interrupt_then_resume_without_remeasuring(tuned, target, monkeypatch):
    """An interrupt after a trial is committed leaves a valid log and schedule; the next run continues."""
    tmp, _ = tuned
    before = TuningLog(tmp / "logs").rows()
    goal = len(_split_rechecks(before)[0]) + 2
    commit = TuningLog.commit

    def commit_then_interrupt(self, *args, **kwargs):
        commit(self, *args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(TuningLog, "commit", commit_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        tune(CFG, target, [BUCKET], _opts(tmp, trials=goal, per_round=2))
    monkeypatch.setattr(TuningLog, "commit", commit)
    log = TuningLog(tmp / "logs")  # reloads the database from disk
    assert len(log.rows()) == len(before) + 1 == len(_records(log))
    assert log.rows()[: len(before)] == before
    assert tuned_knobs.load(CFG, target, tmp / "schedules" / targets.target_key(target) / f"{CFG.name}.json")

    summary = tune(CFG, target, [BUCKET], _opts(tmp, trials=goal, per_round=2))
    log = TuningLog(tmp / "logs")
    rows = log.rows()
    trials, _ = _split_rechecks(rows)
    assert len(trials) == goal and len(rows) == len(_records(log))
    assert len({knob_key(r["knobs"]) for r in trials}) == goal  # no search trial measured twice
    assert summary["buckets"][0]["trials"] == goal
    # Everything asked for is measured: the same budget again measures nothing.
    tune(CFG, target, [BUCKET], _opts(tmp, trials=goal))
    assert len(TuningLog(tmp / "logs").rows()) == len(rows)


def test_rpc_loopback_tune(tmp_path, target):
    base = random.Random().randrange(20000, 40000, 200)
    tracker = start_rpc_tracker("127.0.0.1", port=base, port_end=base + 99)
    server = None
    try:
        server = start_rpc_server("127.0.0.1", tracker.port, "tvm-paged-test", port=base + 100,
                                  port_end=base + 199)
        summary = tune(CFG, target, [BUCKET], _opts(tmp_path, trials=2, per_round=2,
                                                    rpc_tracker=("127.0.0.1", tracker.port),
                                                    rpc_key="tvm-paged-test"))
    finally:
        if server is not None:
            server.terminate()
        tracker.terminate()
    log = TuningLog(tmp_path / "logs")
    records = _records(log)
    assert len(_split_rechecks(log.rows())[0]) == 2 and len(records) == len(log.rows())
    assert all(all(np.isfinite(s) and 0 < s < 1 for s in secs) for secs in records)
    assert summary["buckets"][0]["trials"] == 2 and summary["schedule"]


def test_variant_config_tunes_into_its_own_schedule(tmp_path, target, monkeypatch):
    """`tvm-paged tune --kv-dtype float8_e5m2 --variants w` tunes the e5m2 + window decode kernel (its inputs:
    valid e5m2 codes, scales of 1, a window of half the bucket) and writes a schedule file with the variant's
    name, which lookup then prefers to the plain config's."""
    from tvm_paged.cli import main

    rc = main(["tune", "--target", "local", *CLI_CFG, "--kv-dtype", "float8_e5m2", "--variants", "w", "--buckets",
               "2x8", "--trials", "2", "--per-round", "2", "--work-dir", str(tmp_path / "logs"), "--schedules-dir",
               str(tmp_path / "schedules"), "--pool-mb", "4", "--repeat", "3", "--min-repeat-ms", "10",
               "--no-progress"])
    assert rc == 0
    assert VARIANT.name == "decode_e5m2_f32_h4x2_d64_p8_w"
    path = tmp_path / "schedules" / targets.target_key(target) / f"{VARIANT.name}.json"
    doc = json.loads(path.read_text())
    assert doc["config"] == VARIANT.name and doc["buckets"][0]["gbps"] > 0
    assert not (tmp_path / "schedules" / targets.target_key(target) / f"{CFG.name}.json").exists()
    rows = TuningLog(tmp_path / "logs").rows()
    trials, _ = _split_rechecks(rows)
    assert len(trials) == 2 and all(r["error"] is None and r["gbps"] > 0 for r in rows), rows
    wl = make_workload(VARIANT, BUCKET, pool_mb=4)
    window = wl.window_left + 1  # keys a decode query sees
    assert wl.window_left == 8 * 8 // 2 and wl.scalars["window_left"] == wl.window_left
    assert rows[0]["kv_bytes"] == wl.kv_bytes == 2 * sum(min(n, window) for n in wl.seq_lens) * 2 * 64 * 1
    monkeypatch.setenv("TVM_PAGED_SCHEDULES_DIR", str(tmp_path / "schedules"))
    found = tuned_knobs.lookup(VARIANT, target)
    assert found.config == VARIANT.name and found.source == str(path) and found.knobs == doc["knobs"]


def test_tune_cli_refuses_several_variant_combinations(tmp_path, capsys):
    from tvm_paged.cli import main

    rc = main(["tune", *CLI_CFG, "--variants", "w,cap", "--work-dir", str(tmp_path / "logs"), "--no-progress"])
    assert rc == 2 and "one combination" in capsys.readouterr().err
    rc = main(["tune", *CLI_CFG, "--variants", "w", "--space", "paged", "--work-dir", str(tmp_path / "logs"),
               "--no-progress"])
    assert rc == 2 and "plain block-form kernels only" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()


# -------------------------------------------------------------------------------- applying schedules
def test_tuned_schedule_reproduces_reference(tuned, target, fresh_build, monkeypatch):
    tmp, _ = tuned
    monkeypatch.setenv("TVM_PAGED_SCHEDULES_DIR", str(tmp / "schedules"))
    found = tuned_knobs.lookup(CFG, target)
    # The resume test may have continued this run: compare with the file as it is now.
    doc = json.loads((tmp / "schedules" / targets.target_key(target) / f"{CFG.name}.json").read_text())
    assert found is not None and found.knobs == doc["knobs"]
    assert build.tuned_prim_func(CFG, target).script() == build_kernel(CFG, target, **found.knobs).script()
    _decode_matches_reference()


def test_non_default_schedule_reproduces_reference(target, fresh_build):
    space = KnobSpace(tuned_knobs.knob_space(CFG, target))
    knobs = space.knobs(space.size - 1)  # every knob off its default where it has a choice
    assert knobs != space.default
    tuned_knobs.write(CFG, target, [{"batch": 2, "max_pages": 8, "knobs": knobs, "gbps": 1.0}], root=fresh_build)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tuned_knobs.lookup(CFG, target).knobs == knobs
    _decode_matches_reference(seed=3)


def _good_doc(target):
    space = KnobSpace(tuned_knobs.knob_space(CFG, target))
    knobs = space.knobs(space.size - 1)
    return {"format": 1, "config": CFG.name, "target_key": targets.target_key(target), "knobs": knobs,
            "buckets": [{"batch": 2, "max_pages": 8, "knobs": knobs, "gbps": 1.0}]}


def _corrupt(doc):
    return "{ not json"


def _other_config(doc):
    return json.dumps({**doc, "config": "decode_f32_h8x2_d64_p8"})


def _other_target(doc):
    return json.dumps({**doc, "target_key": "llvm-cortex-a78-8c"})


def _unknown_knob(doc):
    return json.dumps({**doc, "knobs": {**doc["knobs"], "unroll": 4}})


def _bad_value(doc):
    bucket = {**doc["buckets"][0], "knobs": {**doc["knobs"], "lanes": 3}}
    return json.dumps({**doc, "buckets": [bucket]})


def _bool_for_int(doc):
    return json.dumps({**doc, "knobs": {**doc["knobs"], "lanes": True}})


def _no_buckets(doc):
    return json.dumps({**doc, "buckets": []})


@pytest.mark.parametrize("spoil", [_corrupt, _other_config, _other_target, _unknown_knob, _bad_value,
                                   _bool_for_int, _no_buckets])
def test_bad_schedule_file_warns_and_falls_back(spoil, target, tmp_path, monkeypatch):
    monkeypatch.setenv("TVM_PAGED_SCHEDULES_DIR", str(tmp_path))
    path = tuned_knobs.schedule_path(CFG, target)
    path.parent.mkdir(parents=True)
    path.write_text(spoil(_good_doc(target)))
    with pytest.warns(RuntimeWarning, match="ignoring schedule file"):
        assert tuned_knobs.lookup(CFG, target) is None


def test_corrupt_schedule_still_gives_correct_decode(target, fresh_build):
    path = tuned_knobs.schedule_path(CFG, target)
    path.parent.mkdir(parents=True)
    path.write_text(_bad_value(_good_doc(target)))
    with pytest.warns(RuntimeWarning, match="ignoring schedule file"):
        _decode_matches_reference(seed=5)


COMMITTED = sorted((Path(__file__).resolve().parent.parent / "schedules").glob("*/*.json"))


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_committed_schedule_applies_and_shows_current_code(path):
    """Every committed schedule still fits its kernel's knob space (a file that does not is ignored with a warning,
    and that CPU kind silently runs the defaults), and the ``.tvmscript`` beside it is what the build makes from
    its knobs today."""
    doc = json.loads(path.read_text())
    cfg, target = KernelConfig.from_name(doc["config"]), targets.resolve_target(doc["target"])
    assert (path.parent.name, path.stem) == (targets.target_key(target), cfg.name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tuned_knobs.load(cfg, target, path) is not None
    assert not refresh_script(path, write=False), "stale script: run python tools/refresh_schedule_scripts.py"


def test_lookup_picks_nearest_bucket(target, tmp_path, monkeypatch):
    monkeypatch.setenv("TVM_PAGED_SCHEDULES_DIR", str(tmp_path))
    space = KnobSpace(tuned_knobs.knob_space(CFG, target))
    small, large = space.knobs(1), space.knobs(space.size - 1)
    tuned_knobs.write(CFG, target, [{"batch": 1, "max_pages": 1024, "knobs": large, "gbps": 2.0},
                                  {"batch": 8, "max_pages": 8, "knobs": small, "gbps": 1.0}])
    assert tuned_knobs.lookup(CFG, target).knobs == large  # no bucket given: the largest-traffic bucket's
    assert tuned_knobs.lookup(CFG, target, batch=16, max_pages=4).knobs == small
    assert tuned_knobs.lookup(CFG, target, batch=1, max_pages=512).bucket == (1, 1024)
    assert tuned_knobs.lookup(KernelConfig("decode", "float32", 8, 2, 64, 8), target) is None  # no file: silent


def test_describe_names_the_schedule_or_the_tune_command(target, tmp_path, monkeypatch):
    """The demo's "kernels" line: the file a tuned kernel's knobs come from, else a tune command that parses."""
    from tvm_paged.tune import add_arguments, tune_config

    monkeypatch.setenv("TVM_PAGED_SCHEDULES_DIR", str(tmp_path))
    other = KernelConfig("decode", "float16", 6, 3, 80, 5)
    line = tuned_knobs.describe(other, target)
    assert line.startswith(f"{other.name}: no tuned schedule for {targets.target_key(target)}, default knobs")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert tune_config(parser.parse_args(line.split("tvm-paged tune ")[1].rstrip(")").split())) == other
    tuned_knobs.write(CFG, target, [{"batch": 8, "max_pages": 8, "knobs": KnobSpace(
        tuned_knobs.knob_space(CFG, target)).knobs(1), "gbps": 1.0}])
    assert tuned_knobs.describe(CFG, target) == (f"{CFG.name} tuned for {targets.target_key(target)} "
                                                f"({tuned_knobs.schedule_path(CFG, target, tmp_path).resolve()})")


def test_run_time_uses_the_nearest_bucket(target, fresh_build, monkeypatch):
    """paged_decode builds the kernel with the knobs tuned for the bucket nearest its batch, correctly."""
    space = KnobSpace(tuned_knobs.knob_space(CFG, target))
    small, large = space.knobs(1), space.knobs(space.size - 1)
    tuned_knobs.write(CFG, target, [{"batch": 1, "max_pages": 1024, "knobs": large, "gbps": 2.0},
                                  {"batch": 8, "max_pages": 8, "knobs": small, "gbps": 1.0}], root=fresh_build)
    built = []
    real = build._load_or_compile
    monkeypatch.setattr(build, "_load_or_compile", lambda c, t, knobs: built.append(knobs) or real(c, t, knobs))
    _decode_matches_reference()  # batch 5, 8 pages per sequence: nearest to 8x8
    assert built == [small]
    assert build.get_kernel(CFG, target, batch=1, max_pages=900) is not build.get_kernel(CFG, target, batch=6,
                                                                                          max_pages=8)
    assert built == [small, large]


def test_no_schedule_means_default(target, tmp_path, monkeypatch):
    monkeypatch.setenv("TVM_PAGED_SCHEDULES_DIR", str(tmp_path / "none"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tuned_knobs.lookup(CFG, target) is None


def test_variant_falls_back_to_the_plain_schedule(target, fresh_build, monkeypatch):
    """A variant config with no schedule file of its own uses its plain config's (same dtype, heads, head_dim and
    page size, caches in q's dtype, no variant): the knob spaces are the same; its own file, once written, wins.
    Buckets whose knobs are not in the variant's knob space are not used."""
    space = KnobSpace(tuned_knobs.knob_space(CFG, target))
    plain_knobs, own_knobs = space.knobs(space.size - 1), space.knobs(1)
    assert tuned_knobs.knob_space(VARIANT, target) == tuned_knobs.knob_space(CFG, target)
    assert tuned_knobs.plain_config(VARIANT) == CFG and tuned_knobs.plain_config(CFG) is None
    other = KernelConfig("decode", "float32", 8, 2, 64, 8, "float8_e4m3fn", soft_cap=True)
    assert tuned_knobs.plain_config(other) == KernelConfig("decode", "float32", 8, 2, 64, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tuned_knobs.lookup(VARIANT, target) is None  # no file at all: silent, default schedule
    plain_path = tuned_knobs.write(CFG, target, [{"batch": 2, "max_pages": 8, "knobs": plain_knobs, "gbps": 1.0}],
                                   root=fresh_build)
    for cfg in (VARIANT, CFG.with_variants(alibi=True, sinks=True), VARIANT.with_variants(soft_cap=True)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            found = tuned_knobs.lookup(cfg, target)
        assert found.knobs == plain_knobs and found.config == CFG.name and found.source == str(plain_path)
        assert tuned_knobs.load(cfg, target)["config"] == CFG.name
    assert tuned_knobs.lookup(other, target) is None  # another plain config (8 query heads): no file
    assert build.tuned_prim_func(VARIANT, target).script() == build_kernel(VARIANT, target, **plain_knobs).script()
    seq_lens = [61, 9, 40]
    k, v, bt, sl = make_pool(seq_lens, page_size=8, num_kv_heads=2, head_dim=64)
    k8, v8 = reference.quantize_kv(k.view(-1, 2, 64), torch_dtype("float8_e5m2")).view(k.shape), \
        reference.quantize_kv(v.view(-1, 2, 64), torch_dtype("float8_e5m2")).view(v.shape)
    q = random_q(3, 4, 64)
    out = tp.paged_decode(q, k8, v8, bt, sl, window_left=20)  # built with the plain file's knobs
    assert_close(out, reference.decode(q, k8, v8, bt, sl, window_left=20)[0], ATOL["float32"])
    # Knobs outside the variant's own space (a knob space that differs, as a CUDA plan may): not used.
    real = tuned_knobs.knob_space

    def narrower(cfg, tgt):
        sp = real(cfg, tgt)
        return sp if cfg.is_plain else {**sp, "prefetch": sp["prefetch"][:1]}
    monkeypatch.setattr(tuned_knobs, "knob_space", narrower)
    assert plain_knobs["prefetch"] != space.default["prefetch"]
    assert tuned_knobs.lookup(VARIANT, target) is None
    monkeypatch.setattr(tuned_knobs, "knob_space", real)
    own_path = tuned_knobs.write(VARIANT, target, [{"batch": 2, "max_pages": 8, "knobs": own_knobs, "gbps": 1.0}],
                                 root=fresh_build)
    found = tuned_knobs.lookup(VARIANT, target)
    assert found.knobs == own_knobs and found.config == VARIANT.name and found.source == str(own_path)


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


# --------------------------------------------------------------------------------- inputs and the CLI
@pytest.mark.parametrize("kernel", ["decode", "decode_generic", "prefill", "prefill_blocks"])
def test_output_check_fails_a_wrong_variant(kernel):
    """The runner's output check passes the reference's own result and rejects a slightly wrong or NaN one."""
    import torch

    seq_lens = [13, 5, 9]
    k, v, table, sl = make_pool(seq_lens, page_size=4, num_kv_heads=2, head_dim=16, seed=3)
    scale = 0.3
    if kernel.startswith("prefill"):
        q_lens = [4, 5, 2] if kernel == "prefill" else [3, 3, 3]  # the block form: the same rows per sequence
        cu = torch.tensor(np.concatenate([[0], np.cumsum(q_lens)]), dtype=torch.int32)
        q = random_q(int(cu[-1]), 4, 16, seed=4)
        ref, _ = reference.prefill(q, k, v, table, sl, cu, scale=scale)
        extra = {"cu_seqlens_q": cu, "tiles": torch.zeros(1, 3, dtype=torch.int32)}
        wrong_row = int(cu[-2])  # a row of the last sequence: the check samples the first and the last
    else:
        q = random_q(3, 4, 16, seed=4)
        ref, _ = reference.decode(q, k, v, table, sl, scale=scale)
        extra = {}
        wrong_row = 1
    empty = torch.zeros(1)

    def args(out):
        given = dict(q=q, k_cache=k, v_cache=v, block_table=table, seq_lens=sl, out=out, lse=empty, o_part=empty,
                     ms_part=empty, **extra)
        return [given[role] for role in tensor_params(kernel)]

    check = OutputCheck(kernel, scale)
    check(args(ref.float()))
    off = ref.float().clone()
    off[wrong_row, 0, 0] += 1e-3
    with pytest.raises(WrongOutput, match="max abs error"):
        check(args(off))
    off[wrong_row, 0, 0] = float("nan")
    with pytest.raises(WrongOutput):
        check(args(off))


def test_measurement_inputs_are_valid(target):
    """What the runner measures on: tables of distinct in-pool pages covering each length, real lengths."""
    wl = make_workload(CFG, Bucket(3, 5), pool_mb=1, pool_factor=4, tables=2, seed=7)
    mod = wl.shaped(build_kernel(CFG, target))
    args_info = [info.as_json() for info in tc.meta_schedule().arg_info.ArgInfo.from_entry_func(mod)]
    sets = PagedInputs.of(wl)(tc.cpu_device(), args_info, 2)
    assert len(sets) == 2
    roles = tensor_params("decode")
    pages = []
    for args in sets:
        a = dict(zip(roles, (x.numpy() for x in args)))
        assert a["seq_lens"].tolist() == list(wl.seq_lens)
        assert a["block_table"].shape == (3, 5) and a["o_part"].shape[1] == wl.num_splits
        table = a["block_table"]
        assert table.min() >= 0 and table.max() < wl.num_pages == a["k_cache"].shape[0]
        assert len(np.unique(table)) == table.size
        assert np.isfinite(a["k_cache"]).all() and np.isfinite(a["q"]).all()
        pages.append(set(table.ravel().tolist()))
    assert not pages[0] & pages[1]  # the pool holds both tables on distinct pages
    assert wl.kv_bytes == 2 * sum(wl.seq_lens) * CFG.num_kv_heads * CFG.head_dim * 4
    assert max(wl.seq_lens) == 5 * CFG.page_size and min(wl.seq_lens) > 4 * CFG.page_size


def test_fp8_measurement_codes_are_valid():
    """NaN (and e5m2 inf) codes are replaced by finite ones; every other code is kept."""
    import torch

    codes = np.arange(256, dtype=np.uint8)
    for name in ("float8_e4m3fn", "float8_e5m2"):
        fixed = fp8_valid_codes(codes, name)
        values = torch.from_numpy(fixed).view(torch_dtype(name)).float()
        assert torch.isfinite(values).all(), name
        original = torch.from_numpy(codes).view(torch_dtype(name)).float()
        keep = torch.isfinite(original).numpy()
        assert (fixed[keep] == codes[keep]).all() and (~keep).sum() == (2 if name == "float8_e4m3fn" else 8)


@pytest.mark.parametrize("cfg", [
    KernelConfig("decode", "float16", 4, 2, 64, 8, "float8_e4m3fn", window=True, soft_cap=True, alibi=True,
                 sinks=True),
    KernelConfig("prefill", "float32", 4, 2, 64, 8, "float8_e5m2", window=True, soft_cap=True),
    KernelConfig("prefill", "float32", 4, 2, 64, 8, alibi=True, sinks=True),
], ids=lambda c: c.name)
def test_variant_measurement_inputs_and_check(target, cfg):
    """What a variant kernel is measured on: its spec's tensors (scales of 1, the standard ALiBi slopes, zero
    sinks), 8-bit caches of valid codes, the variants' scalars bound; the shipped kernel's output on them passes
    the runner's check, which applies the same options (a check without them fails it)."""
    import torch

    wl = make_workload(cfg, Bucket(3, 5), pool_mb=1, pool_factor=4, tables=2, seed=7, q_len=8)
    func = build_kernel(cfg, target)
    args_info = [info.as_json() for info in tc.meta_schedule().arg_info.ArgInfo.from_entry_func(wl.shaped(func))]
    roles = tensor_params(cfg)
    assert roles == tuple(p.name for p in tp.spec.SPECS[cfg.kernel].params_for(cfg) if p.is_tensor)
    sets = PagedInputs.of(wl)(tc.cpu_device(), args_info, 2)
    fn = tc.compile_module(wl.module(func), targets.with_host(target)).mod["main"]
    check = OutputCheck.of(wl)
    for args in sets:
        a = {role: torch.from_dlpack(x) for role, x in zip(roles, args)}
        if cfg.is_fp8:
            assert a["k_cache"].dtype == torch.uint8
            values = a["k_cache"].view(torch_dtype(cfg.kv_dtype)).float()
            assert torch.isfinite(values).all() and values.abs().max() > 0
            assert (a["k_scale"] == 1).all() and (a["v_scale"] == 1).all()
        if cfg.alibi:
            assert torch.equal(a["alibi_slopes"], alibi_slopes(4, "cpu")) and (a["sinks"] == 0).all()
        fn(*args)
        check(args)
    assert wl.kv_bytes == 2 * sum(wl.visible_keys) * 2 * 64 * cfg.kv_itemsize
    if cfg.window:
        assert wl.scalars["window_left"] == wl.window_left == 5 * 8 // 2
        assert wl.scalars["logits_soft_cap"] == 30.0 and sum(wl.visible_keys) < sum(wl.seq_lens)
        # The check applies the window it is given: another one fails the same output.
        wrong = OutputCheck(cfg.kernel, wl.scale, cfg=cfg, options=tuple(
            (k, 2 if k == "window_left" else v) for k, v in check.options))
        with pytest.raises(WrongOutput):
            wrong(sets[-1])
    else:
        assert "window_left" not in wl.scalars and wl.visible_keys == wl.seq_lens
        # The check reads the slopes from the arguments: other slopes fail the output computed with these.
        torch.from_dlpack(sets[-1][roles.index("alibi_slopes")]).mul_(2)
        with pytest.raises(WrongOutput):
            check(sets[-1])


def test_cuda_target_without_gpu_fails_clearly(tmp_path, capsys):
    if tc.cuda_device(0).exist:
        pytest.skip("this machine has a CUDA device")
    from tvm_paged.cli import main

    rc = main(["tune", "--target", "nvidia/nvidia-h100", "--num-qo-heads", "4", "--num-kv-heads", "2",
               "--head-dim", "64", "--page-size", "8", "--dtype", "float32", "--buckets", "2x8", "--trials", "2",
               "--work-dir", str(tmp_path / "logs"), "--schedules-dir", str(tmp_path / "s"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no local CUDA device" in err and "--rpc-tracker" in err
    assert not (tmp_path / "logs").exists()
    # The same for MetaSchedule's search over the CUDA paged space.
    rc = main(["tune", "--target", "nvidia/nvidia-h100", "--space", "paged", "--num-qo-heads", "4",
               "--num-kv-heads", "2", "--head-dim", "64", "--page-size", "8", "--dtype", "float32", "--buckets",
               "2x8", "--trials", "2", "--work-dir", str(tmp_path / "logs"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no local CUDA device" in err and "--rpc-tracker" in err
    assert not (tmp_path / "logs" / "paged").exists()


@pytest.mark.parametrize("strategy", ["xgb", "mutate", "random"])
def test_proposer_never_repeats_and_finds_the_best(strategy):
    """The search on a synthetic 36-point space: default first, then (guided strategies) every one-knob move
    from it, no repeats, and the guided strategies reach the optimum of a smooth cost within half the space
    (seeded, so deterministic)."""
    from tvm_paged.tuning.space import Proposer

    space = KnobSpace({"lanes": [8, 16, 4], "group_tile": [4, 8, 2, 1], "prefetch": ["kv", "k", "none"]})

    def cost(i):
        k = space.knobs(i)
        return 1.0 + abs(np.log2(k["lanes"]) - 4) + 0.5 * abs(np.log2(k["group_tile"]) - 0) + \
            {"kv": 0.0, "k": 0.3, "none": 1.0}[k["prefetch"]]

    optimum = min(range(space.size), key=cost)
    proposer = Proposer(space, strategy, seed=1)
    measured: dict[int, float] = {}
    order = []
    while len(measured) < 18:
        picks = proposer.propose(measured, 4)
        assert picks and not set(picks) & set(measured) and len(set(picks)) == len(picks)
        for i in picks[: 18 - len(measured)]:
            measured[i] = cost(i)
            order.append(i)
    assert order[0] == 0
    neighbours = set(space.neighbours(0))
    assert len(neighbours) == 7
    if strategy != "random":
        assert set(order[1:8]) == neighbours
        assert proposer.used_model and optimum in measured
    else:
        assert set(order[1:8]) != neighbours
    # A budget that covers what is left is exhaustive.
    rest = proposer.propose(measured, space.size)
    assert sorted(rest + list(measured)) == list(range(space.size))


@pytest.mark.parametrize("space,kernel", [("generic", "decode"), ("paged", "decode"), ("paged", "prefill")])
def test_block_form_spaces_tune(target, tmp_path, space, kernel, capsys):
    """MetaSchedule's search over the generic space and over the paged-attention ScheduleFn space (both kept for
    comparison): a short run measures real trials on valid inputs, and its best schedule, applied to the
    block-form kernel, matches the float64 reference. With a progress bar, the bar reports the best rate."""
    import torch

    from tvm_paged.tuning.block_spaces import best_block_kernel, discard_database, tune_block_form

    cfg = CFG.with_kernel(kernel)
    bucket, q_len = Bucket(3, 4), 8 if kernel == "prefill" else 0
    progress = kernel == "prefill"
    opts = _opts(tmp_path, pool_mb=1, q_len=q_len, progress=progress, population=32)
    summary = tune_block_form(cfg, target, bucket, tmp_path / "logs", trials=4, opts=opts, space=space)
    if progress:
        err = capsys.readouterr().err
        assert "4/4" in err and "GFLOP/s" in err, err[-500:]
    assert summary["trials"] >= 1 and summary["succeeded"] >= 1 and summary["gbps"] > 0
    assert summary["failed"] == summary["trials"] - summary["succeeded"]
    assert json.loads((tmp_path / "logs" / space / "3x4" / "summary.json").read_text())["gflops"] > 0
    exe = best_block_kernel(cfg, target, bucket, tmp_path / "logs", opts=opts, space=space)
    assert exe is not None
    # The block-form kernel reads every table entry up to max_pages: a full table of distinct valid pages.
    wl = make_workload(cfg, bucket, pool_mb=1, pool_factor=4, tables=2, seed=0, q_len=q_len)
    seq_lens = list(wl.seq_lens)
    gen = torch.Generator().manual_seed(5)
    shape = (wl.num_pages, cfg.page_size, cfg.num_kv_heads, cfg.head_dim)
    pool_k, pool_v = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    table = torch.randperm(wl.num_pages, generator=gen)[:12].view(3, 4).int()
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    q = random_q(3 * max(q_len, 1), cfg.num_qo_heads, cfg.head_dim, seed=6)
    out = torch.empty_like(q)
    exe.mod["main"](q, pool_k, pool_v, table, sl, out)
    if kernel == "prefill":
        cu = torch.arange(4, dtype=torch.int32) * q_len
        ref, _ = reference.prefill(q, pool_k, pool_v, table, sl, cu)
    else:
        ref, _ = reference.decode(q, pool_k, pool_v, table, sl)
    assert_close(out, ref, ATOL["float32"])
    discard_database(tmp_path / "logs", bucket, space)
    assert not (tmp_path / "logs" / space / "3x4" / "ms").exists()


def test_paged_space_cuda_search_builds_device_code(tmp_path, monkeypatch):
    """MetaSchedule's search over the CUDA paged decode space, as `tvm-paged tune --space paged` runs it through
    an RPC tracker from a machine with no GPU: its evolutionary rounds (trace replay, mutated decisions, the CUDA
    postprocessors) and the real builder (device code by nvcc, in a child process with a libcuda stub). No GPU
    here, so a stand-in runner times each library by a hash of its bytes after checking that it holds CUDA
    device code: what this checks is that every candidate the search proposes builds, not its speed (the
    emulator in test_cuda_codegen.py checks the space's kernels against the reference)."""
    import hashlib
    import shutil

    from tvm_paged.tuning import block_spaces
    from tvm_paged.tuning.block_spaces import tune_block_form
    from tvm_paged.tuning.ms_glue import python_runner
    from tvm_paged.tuning.paged_space import DECISIONS

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH")
    if tc.cuda_codegen_available():
        pytest.skip("this process has a CUDA driver: the builder embeds device code without the stub")
    built = []

    def measure(path: str) -> list[float]:
        data = open(path, "rb").read()
        # A fatbin (magic 50 ED 55 BA) or a CUDA ELF (e_machine 190) inside the exported library.
        assert b"\x50\xed\x55\xba" in data or b"\x7fELF\x02\x01\x01\x33" in data, "no CUDA device code"
        built.append(path)
        return [1e-4 * (1 + int(hashlib.sha1(data).hexdigest()[:4], 16) % 97)]

    monkeypatch.setattr(block_spaces, "check_device", lambda target, opts: "cuda")
    monkeypatch.setattr(block_spaces, "make_runner", lambda wl, device_type, opts, inputs=None: python_runner(measure))
    cfg = KernelConfig("decode", "float16", 8, 2, 128, 16)
    opts = _opts(tmp_path, pool_mb=1, per_round=1, population=32, rpc_tracker=("127.0.0.1", 9190),
                 rpc_key="h100")  # two rounds of two
    summary = tune_block_form(cfg, targets.resolve_target("nvidia/nvidia-h100"), Bucket(4, 8), tmp_path / "logs",
                              trials=4, opts=opts, space="paged")
    assert summary["trials"] == 4 and summary["succeeded"] == 4 and len(built) == 4, summary
    assert summary["gbps"] > 0 and set(summary["decisions"]) == set(DECISIONS["decode_cuda"])
    assert summary["decisions"]["kv_splits"] in (1, 2, 4, 8)


@pytest.mark.parametrize("heads,dtypes", [((7, 1), ("float32", "float16")), ((2, 2), ("float32",))],
                         ids=["group7", "mha"])
def test_paged_space_samples_correct_kernels(target, heads, dtypes):
    """Every point of the paged-attention ScheduleFn space is a correct program: odd shapes (a group of 7 query
    heads, and MHA; head_dim 80, page 5, lengths 1 to full), every KV split count and lane width the space
    samples, float32 and float16, NaN in every slot past a sequence's length, against the float64 reference."""
    import torch

    from tvm_paged.targets import with_host
    from tvm_paged.kernels.decode_generic import build_decode_generic
    from tvm_paged.tuning.paged_space import LANES, decisions, decode_space

    batch, max_pages, num_pages = 3, 4, 29
    for dtype in dtypes:
        cfg = KernelConfig("decode", dtype, *heads, 80, 5)
        mod = tc.ir_module({"main": build_decode_generic(cfg, batch, max_pages, num_pages, weights=True)
                            .with_attr("global_symbol", "main")})
        gen = torch.Generator().manual_seed(11)
        shape = (num_pages, cfg.page_size, cfg.num_kv_heads, cfg.head_dim)
        k = torch.randn(shape, generator=gen).to(getattr(torch, dtype))
        v = torch.randn(shape, generator=gen).to(getattr(torch, dtype))
        table = torch.randperm(num_pages, generator=gen)[: batch * max_pages].view(batch, max_pages).int()
        seq_lens = torch.tensor([20, 17, 1], dtype=torch.int32)
        for b, n in enumerate(seq_lens.tolist()):  # NaN in the slots a sequence's table covers but it does not use
            for t in range(n, max_pages * cfg.page_size):
                page, slot = table[b, t // cfg.page_size].item(), t % cfg.page_size
                k[page, slot], v[page, slot] = float("nan"), float("nan")
        q = random_q(batch, cfg.num_qo_heads, cfg.head_dim, seed=12).to(getattr(torch, dtype))
        ref, _ = reference.decode(q, k, v, table, seq_lens)
        want = {("kv_splits", s) for s in (1, 2, 4)} | {("lanes", n) for n in LANES}
        seen: set = set()
        for seed in range(1, 60):
            sch = tc.Schedule(mod, seed=seed)
            decode_space(cfg, max_pages)(sch)
            dec = decisions(sch.trace)
            new = {("kv_splits", dec["kv_splits"]), ("lanes", dec["lanes"])} - seen
            if not new:
                continue
            seen |= new
            out = torch.empty_like(q)
            tc.compile_module(sch.mod, with_host(target)).mod["main"](q, k, v, table, seq_lens, out)
            assert_close(out, ref, ATOL[dtype], f"out of {cfg.name} at {dec}")
            if seen >= want:
                break
        assert seen >= want, f"the space never sampled {sorted(want - seen)}"


def test_paged_space_samples_correct_prefill_kernels(target):
    """The prefill ScheduleFn space likewise: every query-tile and lane width it samples gives a correct causal
    prefill (group of 7, head_dim 80, page 5, 6 query rows per sequence, NaN past each length)."""
    import torch

    from tvm_paged.targets import with_host
    from tvm_paged.kernels.prefill_blocks import build_prefill_blocks
    from tvm_paged.tuning.paged_space import LANES, decisions, prefill_space

    batch, max_pages, num_pages, q_len = 3, 4, 29, 6
    cfg = KernelConfig("prefill", "float32", 7, 1, 80, 5)
    mod = tc.ir_module({"main": build_prefill_blocks(cfg, batch, max_pages, num_pages, q_len)
                        .with_attr("global_symbol", "main")})
    gen = torch.Generator().manual_seed(13)
    shape = (num_pages, cfg.page_size, cfg.num_kv_heads, cfg.head_dim)
    k, v = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    table = torch.randperm(num_pages, generator=gen)[: batch * max_pages].view(batch, max_pages).int()
    seq_lens = torch.tensor([20, 17, 6], dtype=torch.int32)
    for b, n in enumerate(seq_lens.tolist()):
        for t in range(n, max_pages * cfg.page_size):
            page, slot = table[b, t // cfg.page_size].item(), t % cfg.page_size
            k[page, slot], v[page, slot] = float("nan"), float("nan")
    q = random_q(batch * q_len, cfg.num_qo_heads, cfg.head_dim, seed=14)
    ref, _ = reference.prefill(q, k, v, table, seq_lens, torch.arange(batch + 1, dtype=torch.int32) * q_len)
    want = {("q_tile", n) for n in (1, 2, 3, 6)} | {("lanes", n) for n in LANES}
    seen: set = set()
    for seed in range(1, 80):
        sch = tc.Schedule(mod, seed=seed)
        prefill_space(cfg, q_len)(sch)
        dec = decisions(sch.trace, "prefill")
        new = {("q_tile", dec["q_tile"][1]), ("lanes", dec["lanes"])} - seen
        if not new:
            continue
        seen |= new
        out = torch.empty_like(q)
        tc.compile_module(sch.mod, with_host(target)).mod["main"](q, k, v, table, seq_lens, out)
        assert_close(out, ref, ATOL["float32"], f"out of {cfg.name} at {dec}")
        if seen >= want:
            break
    assert seen >= want, f"the space never sampled {sorted(want - seen)}"


def test_block_form_spaces_refuse_what_they_cannot_tune(target, tmp_path):
    """Requests the block-form spaces cannot serve stop with a clear message before any work."""
    from tvm_paged.tuning.block_spaces import check_request
    from tvm_paged.tuning.search import TuneError

    prefill = CFG.with_kernel("prefill")
    with pytest.raises(TuneError, match="only the decode kernel"):
        check_request(prefill, target, _opts(tmp_path, q_len=8), "generic")
    with pytest.raises(TuneError, match="--q-len"):
        check_request(prefill, target, _opts(tmp_path), "paged")
    h100 = targets.resolve_target("nvidia/nvidia-h100")
    with pytest.raises(TuneError, match="on CUDA targets only --space paged, for decode"):
        check_request(CFG, h100, _opts(tmp_path), "generic")
    with pytest.raises(TuneError, match="on CUDA targets only --space paged, for decode"):
        check_request(prefill, h100, _opts(tmp_path, q_len=8), "paged")
    with pytest.raises(TuneError, match="CPU targets are tuned on this machine only"):
        check_request(CFG, target, _opts(tmp_path, rpc_tracker=("127.0.0.1", 9190), rpc_key="k"), "paged")
    check_request(CFG, h100, _opts(tmp_path), "paged")  # CUDA decode: measured on a GPU here or through RPC
    with pytest.raises(ValueError, match="space must be one of"):
        check_request(CFG, target, _opts(tmp_path), "tiles")
    check_request(prefill, target, _opts(tmp_path, q_len=8), "paged")  # a valid request passes


def test_summary_decides_from_the_runoff_not_a_lucky_trial():
    """The runoff's means decide: a point timed once at a fast moment (30 GB/s in the search) enters with its
    runoff mean only; only the last runoff counts, and one without the default decides nothing (the summary then
    falls back to each point's last timing)."""
    from tvm_paged.tuning.search import runoff_rows

    space = KnobSpace({"lanes": [8, 16, 4], "prefetch": ["v+k", "kv"]})
    a, b, c = space.default, {"lanes": 16, "prefetch": "v+k"}, {"lanes": 8, "prefetch": "kv"}

    def row(knobs, gbps, trial, recheck=False):
        return {"knobs": knobs, "gbps": gbps, "ms": 100 / gbps, "trial": trial, "recheck": recheck}

    search = [row(a, 22.0, 0), row(b, 30.0, 1), row(c, 24.0, 2)]
    runoff = [{**row(c, 40.0, 3, True), "warmup": True}]  # the leading warm-up call is not counted
    runoff += [row(k, g, 3, True) for k, g in ((a, 22.0), (b, 21.0), (c, 23.5), (c, 23.1), (b, 21.4), (a, 21.8))]
    decided = runoff_rows(search + runoff, space)
    assert set(decided) == {knob_key(k) for k in (a, b, c)}
    assert decided[knob_key(c)]["gbps"] == pytest.approx(23.3) and decided[knob_key(a)]["gbps"] == pytest.approx(21.9)
    # Only the last runoff counts; one without the default decides nothing.
    later = [row(b, 25.0, 9, True), row(b, 25.0, 9, True)]
    assert runoff_rows(search + runoff + later, space) == {}
    assert runoff_rows(search, space) == {}


def test_read_rate_reports_the_best_pass(monkeypatch):
    """The read roof is the fastest of its passes (a slow pass is the machine being busy, not its memory), in GB/s
    of the buffer's bytes, whatever its dtype."""
    import types

    import torch

    from tvm_paged.tuning import measure

    ticks = iter([0.0, 2e-3, 10.0, 10.001, 20.0, 20.004])  # passes of 2 ms, 1 ms, 4 ms
    monkeypatch.setattr(measure, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    buf = torch.ones(1000, 500, dtype=torch.float16)  # 1 MB
    assert measure.read_rate(buf, reads=3) == pytest.approx(1e6 / 1e-3 / 1e9)
