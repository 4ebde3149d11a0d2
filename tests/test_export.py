"""Export and load: round trips against the in-process kernels, refusals, and what cross exports hold.

One small configuration (float32, h4x2, d64, p5). The local CPU exports (plain, and with 8-bit e4m3 caches and
the window + soft-cap variant) are built once per module; the CUDA exports (H100 on x86-64, Jetson Orin on
aarch64, each with an 8-bit cache and a variant combination) are built once each and skipped when the CUDA
kernels, nvcc or the cross toolchain are missing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tvm_paged as tp
from tvm_paged import binary as B
from tvm_paged import export as E
from tvm_paged import reference
from tvm_paged import toolchain as T
from tvm_paged.config import KernelConfig
from tvm_paged.spec import SPECS
from tvm_paged.loader import AbiMismatchError, IntegrityError, LoadError, load
from paged_data import ATOL, LSE_ATOL, assert_close, make_pool, make_variant_pool, random_q

ROOT = Path(__file__).resolve().parents[1]
CFG = {"dtype": "float32", "num_qo_heads": 4, "num_kv_heads": 2, "head_dim": 64, "page_size": 5}
CLI_CFG = ["--dtype", "float32", "--num-qo-heads", "4", "--num-kv-heads", "2", "--head-dim", "64", "--page-size", "5"]


BASE = KernelConfig("decode", **CFG)
# The variant export: 8-bit e4m3 caches besides float32 ones, and the window + soft-cap combination besides none.
VARIANT_CLI = ["--kv-dtype", "float8_e4m3fn", "--variants", "w+cap"]


def _cli_export(target: str, out: Path, extra=()) -> dict:
    parser = argparse.ArgumentParser()
    E.add_arguments(parser)
    assert E.run(parser.parse_args(["--target", target, *CLI_CFG, *extra, "-o", str(out)])) == 0
    return json.loads((out / E.MANIFEST).read_text())


def _names(kv_dtypes, combos) -> set[str]:
    """Names of the kernels an export of BASE with these cache dtypes and variant flag dicts holds."""
    out = set()
    for kv in kv_dtypes:
        for flags in combos:
            out |= {BASE.with_kernel(k).with_variants(kv_dtype=kv, **flags).name for k in ("decode", "prefill")}
        out |= {KernelConfig.for_pages("write_kv", "float32", 2, 64, 5, kv).name,
                KernelConfig.for_pages("copy_pages", kv, 2, 64, 5).name}
    return out


@pytest.fixture(scope="module")
def local_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("export_local")
    return out, _cli_export("local", out)


def _copy(export_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(export_dir, dst)
    return dst


# ------------------------------------------------------------------------------------------- manifest
def test_manifest_describes_the_library(local_export):
    out, m = local_export
    lib = out / m["library"]["file"]
    assert sorted(p.name for p in out.iterdir()) == sorted([E.MANIFEST, lib.name])
    assert m["library"]["sha256"] == B.sha256_file(lib)
    assert m["format"] == B.FORMAT == "tvm_paged-export/3"
    assert m["config"] == {"name": "f32_h4x2_d64_p5", **CFG, "kv_dtypes": ["float32"], "variants": [[]]}
    assert m["target"]["kind"] == "cpu" and m["target"]["spec"] == "local"
    assert m["versions"]["tvm"] and m["versions"]["tvm_ffi"]
    assert m["contents"] == {"elf_machine": B.host_machine(), "modules": [], "device_code": []}
    assert set(m["kernels"]) == {BASE.with_kernel(k).name for k in ("decode", "prefill", "write_kv", "copy_pages")}
    for name, info in m["kernels"].items():
        cfg = KernelConfig.from_name(name)
        assert (info["symbol"], info["family"], info["variants"], info["kv_dtype"]) == (name, cfg.kernel, [],
                                                                                         "float32")
        assert [p["name"] for p in info["params"]] == list(SPECS[cfg.kernel].names_for(cfg))
        assert info["params"] == SPECS[cfg.kernel].signature(cfg)
        assert info["schedule"]["tuned"] in (True, False)
    q = m["kernels"][BASE.name]["params"][0]
    assert q["shape"][1:] == [4, 64] and isinstance(q["shape"][0], str) and q["dtype"] == "float32"


@pytest.fixture(scope="module")
def variant_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("export_variants")
    return out, _cli_export("local", out, VARIANT_CLI)


def test_variant_manifest_records_every_kernel(variant_export):
    """An export with --kv-dtype and --variants holds decode and prefill for every (cache dtype, combination) and
    the page kernels for every cache dtype; each kernel's entry records its family, variant tags, cache dtype and
    its full signature (the variants' parameters included)."""
    out, m = variant_export
    assert m["config"]["kv_dtypes"] == ["float32", "float8_e4m3fn"]
    assert m["config"]["variants"] == [[], ["w", "cap"]]
    wc = {"window": True, "soft_cap": True}
    assert set(m["kernels"]) == _names(["float32", "float8_e4m3fn"], [{}, wc])
    for name, info in m["kernels"].items():
        cfg = KernelConfig.from_name(name)
        assert (info["symbol"], info["family"], info["variants"], info["kv_dtype"]) == (
            name, cfg.kernel, list(cfg.variants), cfg.kv_dtype)
        assert info["params"] == SPECS[cfg.kernel].signature(cfg)
    params = {p["name"]: p for p in m["kernels"]["decode_e4m3_f32_h4x2_d64_p5_w_cap"]["params"]}
    assert {"k_scale", "v_scale", "window_left", "logits_soft_cap", "split_pages"} <= set(params)
    assert params["k_cache"]["dtype"] == "uint8" and params["k_scale"]["shape"] == [2]
    assert params["window_left"] == {"name": "window_left", "role": "scalar", "dtype": "int32"}
    assert "window_left" not in {p["name"] for p in m["kernels"]["decode_f32_h4x2_d64_p5"]["params"]}
    assert [p["name"] for p in m["kernels"]["write_kv_e4m3_f32_h2_d64_p5"]["params"]][-2:] == ["k_scale", "v_scale"]
    lib = load(out)
    assert set(lib.kernels) == set(m["kernels"]) and lib.kv_dtypes == ("float32", "float8_e4m3fn")
    assert lib.variants == ((), ("w", "cap"))


def test_export_request_errors(tmp_path):
    """Bad --kv-dtype / --variants values are refused before anything is built."""
    with pytest.raises(ValueError, match="kv_dtype"):
        E.export(CFG, "local", tmp_path, kv_dtypes=["float16"])
    with pytest.raises(ValueError, match="unknown variant 'slide'"):
        E.export(CFG, "local", tmp_path, variants=["w+slide"])
    parser = argparse.ArgumentParser()
    E.add_arguments(parser)
    assert E.run(parser.parse_args([*CLI_CFG, "--variants", "w,bogus", "-o", str(tmp_path)])) == 1
    assert not list(tmp_path.iterdir())
    assert [E._variant_combos(v) for v in (None, "w,w+cap", ["cap+w"])] == [
        [{"window": False, "soft_cap": False, "alibi": False, "sinks": False}],
        [{"window": False, "soft_cap": False, "alibi": False, "sinks": False},
         {"window": True, "soft_cap": False, "alibi": False, "sinks": False},
         {"window": True, "soft_cap": True, "alibi": False, "sinks": False}],
        [{"window": False, "soft_cap": False, "alibi": False, "sinks": False},
         {"window": True, "soft_cap": True, "alibi": False, "sinks": False}]]
    assert len(E._variant_combos("all")) == 16


# ------------------------------------------------------------------------------- round trip, fresh process
_NO_COMPILER = r'''
import importlib.abc, sys, types

class _Blocked(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise AssertionError(f"{self.__name__}.{name} used while loading an export")

sys.modules["tvm_paged.build"] = _Blocked("tvm_paged.build")

class _NoImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("xgboost", "psutil", "cloudpickle") or name.startswith(
                ("tvm_paged.kernels", "tvm_paged.tune", "tvm_paged.tuned_knobs")):
            raise ImportError(f"{name} imported while loading an export")
        return None

sys.meta_path.insert(0, _NoImport())
import tvm

def _no_compile(*args, **kwargs):
    raise AssertionError("tvm.compile called while loading an export")

tvm.compile = _no_compile
tvm.s_tir.meta_schedule.tune_tir = _no_compile  # `import tvm` imports MetaSchedule itself; it must stay unused
'''

_RUN_LOADED = r'''
import torch
from tvm_paged.loader import load

export_dir, data_path, out_path = sys.argv[1:4]
lib = load(export_dir)
d = torch.load(data_path)
res = {"decode": lib.paged_decode(d["q"], d["k"], d["v"], d["bt"], d["sl"], return_lse=True)}
plan = lib.plan_decode(d["bt"], d["sl"], num_pages=d["k"].shape[0])
res["run_decode"] = lib.run_decode(plan, d["q"], d["k"], d["v"])
if any(c.kernel == "prefill" for c in lib.configs):
    res["prefill"] = lib.paged_prefill(d["pq"], d["k"], d["v"], d["bt"], d["sl"], d["cu"], return_lse=True)
k, v = d["k"].clone(), d["v"].clone()
lib.write_kv(d["nk"], d["nv"], k, v, d["slots"])
lib.copy_pages(k, v, d["src"], d["dst"])
res["k"], res["v"] = k, v
leaked = sorted(m for m in sys.modules if m.startswith(("tvm_paged.kernels", "tvm_paged.tune", "xgboost")))
assert not leaked, leaked
torch.save(res, out_path)
'''


def _data():
    k, v, bt, sl = make_pool([17, 3, 26], page_size=5, num_kv_heads=2, head_dim=64, extra_pages=4)
    num_pages = k.shape[0]
    used = set(bt[bt >= 0].tolist())
    free = [p for p in range(num_pages) if p not in used]
    gen = torch.Generator().manual_seed(3)
    return {
        "k": k, "v": v, "bt": bt, "sl": sl,
        "q": random_q(3, 4, 64),
        "pq": random_q(11, 4, 64, seed=2),
        "cu": torch.tensor([0, 7, 7, 11], dtype=torch.int32),  # chunked: 7 + 0 + 4 queries
        "nk": torch.randn(4, 2, 64, generator=gen), "nv": torch.randn(4, 2, 64, generator=gen),
        "slots": torch.tensor([free[0] * 5, free[0] * 5 + 3, -1, free[1] * 5 + 4], dtype=torch.int64),
        "src": torch.tensor([int(bt[0, 0]), int(bt[2, 1])], dtype=torch.int32),
        "dst": torch.tensor([free[2], free[3]], dtype=torch.int32),
    }


def _in_process(d: dict, with_prefill: bool) -> dict:
    res = {"decode": tp.paged_decode(d["q"], d["k"], d["v"], d["bt"], d["sl"], return_lse=True)}
    res["run_decode"] = res["decode"][0]
    if with_prefill:
        res["prefill"] = tp.paged_prefill(d["pq"], d["k"], d["v"], d["bt"], d["sl"], d["cu"], return_lse=True)
    k, v = d["k"].clone(), d["v"].clone()
    tp.write_kv(d["nk"], d["nv"], k, v, d["slots"])
    tp.copy_pages(k, v, d["src"], d["dst"])
    res["k"], res["v"] = k, v
    return res


def _same(a, b, what):
    for x, y in zip(a, b) if isinstance(a, tuple) else [(a, b)]:
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


@pytest.fixture(scope="module")
def loaded_results(local_export, tmp_path_factory):
    """Run the export in a fresh process with no compiler: tvm.compile, MetaSchedule's tune_tir and
    tvm_paged.build raise on use, the kernels, tuning and its packages can't be imported, PATH is empty (no gcc,
    no nvcc)."""
    out, m = local_export
    tmp = tmp_path_factory.mktemp("roundtrip")
    d = _data()
    torch.save(d, tmp / "data.pt")
    env = {k: v for k, v in os.environ.items() if k != "PATH"}
    env["PATH"] = ""
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-c", _NO_COMPILER + _RUN_LOADED, str(out), str(tmp / "data.pt"),
                           str(tmp / "res.pt")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d, torch.load(tmp / "res.pt")


def test_loaded_library_matches_in_process_kernels(loaded_results):
    d, got = loaded_results
    want = _in_process(d, with_prefill=False)
    _same(got["decode"], want["decode"], "paged_decode (out, lse)")
    _same(got["run_decode"], want["run_decode"], "plan_decode + run_decode")
    _same(got["k"], want["k"], "write_kv + copy_pages: k_cache")
    _same(got["v"], want["v"], "write_kv + copy_pages: v_cache")


def test_loaded_prefill_matches_in_process(loaded_results):
    d, got = loaded_results
    want = _in_process(d, with_prefill=True)
    _same(got["prefill"], want["prefill"], "paged_prefill (out, lse)")


# ------------------------------------------------------------------------------------------- refusals
def test_tampered_library_refused(local_export, tmp_path):
    out, m = local_export
    dst = _copy(out, tmp_path)
    lib = dst / m["library"]["file"]
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lib.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="SHA-256"):
        load(dst)
    assert issubclass(IntegrityError, ValueError)


def test_missing_library_refused(local_export, tmp_path):
    out, m = local_export
    dst = _copy(out, tmp_path)
    (dst / m["library"]["file"]).unlink()
    with pytest.raises(LoadError, match="missing"):
        load(dst)


@pytest.mark.parametrize("key", ["tvm", "tvm_ffi"])
def test_manifest_from_another_abi_refused(local_export, tmp_path, key):
    out, _ = local_export
    dst = _copy(out, tmp_path)
    manifest = json.loads((dst / E.MANIFEST).read_text())
    manifest["versions"][key] = "0.0.1"
    (dst / E.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(AbiMismatchError, match=f"{key} 0.0.1"):
        load(dst)


@pytest.mark.parametrize("versions", [None, "0.27", ["tvm"]])
def test_manifest_with_malformed_versions_refused(local_export, tmp_path, versions):
    out, _ = local_export
    dst = _copy(out, tmp_path)
    manifest = json.loads((dst / E.MANIFEST).read_text())
    manifest["versions"] = versions
    (dst / E.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(LoadError, match="versions is not an object"):
        load(dst)


@pytest.mark.parametrize("change", ["role", "dtype", "order", "missing", "kernel", "variants", "kv_dtype"])
def test_manifest_with_another_calling_convention_refused(local_export, tmp_path, change):
    """The loader binds arguments by the specs of this version: a library whose recorded parameters differ in
    role, dtype or order (a variant's parameter included), whose kernel entries claim other variants or cache
    dtypes than their names mean, or that lacks a kernel, is refused at load, before any call."""
    out, _ = local_export
    dst = _copy(out, tmp_path)
    manifest = json.loads((dst / E.MANIFEST).read_text())
    entry = manifest["kernels"][BASE.name]
    params = {p["name"]: p for p in entry["params"]}
    if change == "role":
        params["ms_part"]["role"] = "output"  # scratch
    elif change == "dtype":
        params["block_table"]["dtype"] = "int64"
    elif change == "order":
        entry["params"][1], entry["params"][2] = entry["params"][2], entry["params"][1]
    elif change == "missing":  # a build whose decode took no split_pages
        entry["params"] = [p for p in entry["params"] if p["name"] != "split_pages"]
    elif change == "variants":
        entry["variants"] = ["w"]
    elif change == "kv_dtype":
        entry["kv_dtype"] = "float8_e4m3fn"
    else:
        del manifest["kernels"][KernelConfig.for_pages("copy_pages", "float32", 2, 64, 5).name]
    (dst / E.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(LoadError, match="re-export" if change != "kernel" else "holds kernels"):
        load(dst, verify=False)


@pytest.mark.parametrize("fmt", ["tvm_paged-export/2", "tvm_paged-export/1"])
def test_export_of_an_older_format_refused(local_export, tmp_path, fmt):
    """A manifest of an older layout (format 2: kernels keyed by family, no variants) is refused with a clear
    message to re-export, before the library is opened."""
    out, _ = local_export
    dst = _copy(out, tmp_path)
    manifest = json.loads((dst / E.MANIFEST).read_text())
    manifest["format"] = fmt
    if fmt.endswith("/2"):  # the layout format 2 wrote
        manifest["kernels"] = {KernelConfig.from_name(n).kernel: {"symbol": n, "params": i["params"]}
                               for n, i in manifest["kernels"].items()}
        for key in ("kv_dtypes", "variants"):
            del manifest["config"][key]
    (dst / E.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(LoadError, match=rf"format '{fmt}' is from another tvm_paged version.*re-export"):
        load(dst)
    manifest["format"] = "something/else"
    (dst / E.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(LoadError, match="not a tvm_paged export of this version"):
        load(dst)


@pytest.fixture(scope="module")
def lib(local_export):
    return load(local_export[0])


def _decode_args(*, hq=4, hkv=2, d=64, p=5, dtype="float32"):
    k, v, bt, sl = make_pool([7, 12], page_size=p, num_kv_heads=hkv, head_dim=d, dtype=dtype)
    return random_q(2, hq, d, dtype), k, v, bt, sl


@pytest.mark.parametrize("kwargs, pattern", [
    ({"hq": 8}, r"^q: num_qo_heads 8"),
    ({"hq": 2, "hkv": 1}, r"^k_cache: num_kv_heads 1"),
    ({"d": 32}, r"^q: head_dim 32"),
    ({"p": 4}, r"^k_cache: page_size 4"),
    ({"dtype": "float16"}, r"^q: dtype float16"),
], ids=["num_qo_heads", "num_kv_heads", "head_dim", "page_size", "dtype"])
def test_decode_outside_the_exported_config_rejected(lib, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        lib.paged_decode(*_decode_args(**kwargs))


def test_page_ops_outside_the_exported_config_rejected(lib):
    k, v, _, _ = make_pool([7], page_size=5, num_kv_heads=2, head_dim=64, dtype="float16")
    with pytest.raises(ValueError, match=r"^k_cache: dtype float16"):
        lib.write_kv(k[0].clone(), v[0].clone(), k, v, torch.arange(5, dtype=torch.int32))
    k, v, _, _ = make_pool([7], page_size=5, num_kv_heads=2, head_dim=32)
    with pytest.raises(ValueError, match=r"^k_cache: head_dim 32"):
        lib.copy_pages(k, v, torch.tensor([0], dtype=torch.int32), torch.tensor([1], dtype=torch.int32))


def test_shared_validation_still_applies(lib):
    q, k, v, bt, sl = _decode_args()
    with pytest.raises(ValueError, match=r"^q: expected rank 3"):
        lib.paged_decode(q[0], k, v, bt, sl)
    with pytest.raises(ValueError, match=r"^block_table"):
        lib.paged_decode(q, k, v, bt + 1000, sl)
    with pytest.raises(ValueError, match=r"^page_size: 16"):
        lib.plan_decode(bt, sl, num_pages=k.shape[0], page_size=16)


# --------------------------------------------------------------------------------------- variant kernels
K_SCALE = torch.tensor([0.5, 2.0])  # per KV head
V_SCALE = 1.5
OPTIONS = {"window_left": 7, "logits_soft_cap": 1.5}


@pytest.fixture(scope="module")
def variant_lib(variant_export):
    return load(variant_export[0])


def _fp8_data():
    seq_lens = [17, 3, 26]
    k, v, bt, sl = make_variant_pool(seq_lens, page_size=5, num_kv_heads=2, head_dim=64, kv_dtype="float8_e4m3fn",
                                     k_scale=K_SCALE, v_scale=V_SCALE, extra_pages=4)
    return k, v, bt, sl, random_q(3, 4, 64), random_q(11, 4, 64, seed=2), torch.tensor([0, 7, 7, 11],
                                                                                         dtype=torch.int32)


def test_fp8_window_cap_export_matches_reference(variant_lib):
    """The e4m3 + window + soft-cap kernels of a loaded export against the float64 reference with the same
    options (the caches dequantized with per-head and per-tensor scales): decode, plan + run, prefill."""
    k, v, bt, sl, q, pq, cu = _fp8_data()
    scales = {"k_scale": K_SCALE, "v_scale": V_SCALE}
    out, lse = variant_lib.paged_decode(q, k, v, bt, sl, **OPTIONS, **scales, return_lse=True)
    ref, ref_lse = reference.decode(q, k, v, bt, sl, **OPTIONS, **scales)
    assert_close(out, ref, ATOL["float32"])
    assert_close(lse, ref_lse, LSE_ATOL["float32"], "lse")
    plain, _ = reference.decode(q, k, v, bt, sl, **scales)
    assert (plain - ref).abs().max() > 0.05, "the options must change the result for this test to mean anything"
    plan = variant_lib.plan_decode(bt, sl, num_pages=k.shape[0], window_left=OPTIONS["window_left"])
    again = variant_lib.run_decode(plan, q, k, v, logits_soft_cap=OPTIONS["logits_soft_cap"], **scales)
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    pout, plse = variant_lib.paged_prefill(pq, k, v, bt, sl, cu, **OPTIONS, **scales, return_lse=True)
    pref, pref_lse = reference.prefill(pq, k, v, bt, sl, cu, **OPTIONS, **scales)
    assert_close(pout, pref, ATOL["float32"])
    assert_close(plse, pref_lse, LSE_ATOL["float32"], "prefill lse")
    # The same library's plain kernels, on float32 caches and on 8-bit ones.
    out = variant_lib.paged_decode(q, k, v, bt, sl, **scales)
    assert_close(out, plain, ATOL["float32"], "plain e4m3 decode")
    k32, v32, bt32, sl32 = make_pool([17, 3, 26], page_size=5, num_kv_heads=2, head_dim=64)
    assert_close(variant_lib.paged_decode(q, k32, v32, bt32, sl32), reference.decode(q, k32, v32, bt32, sl32)[0],
                 ATOL["float32"], "plain float32 decode")


def test_fp8_page_kernels_of_an_export(variant_lib):
    """write_kv into e4m3 caches stores what reference.quantize_kv does (bit for bit); copy_pages copies the
    bytes."""
    k, v, bt, sl, *_ = _fp8_data()
    used = set(bt[bt >= 0].tolist())
    free = [p for p in range(k.shape[0]) if p not in used]
    gen = torch.Generator().manual_seed(9)
    nk, nv = torch.randn(3, 2, 64, generator=gen) * 4, torch.randn(3, 2, 64, generator=gen) * 4
    nk[0, 0, 0] = 1e6  # clamped to the format's largest finite value, never inf or NaN
    slots = torch.tensor([free[0] * 5, free[0] * 5 + 4, free[1] * 5 + 2], dtype=torch.int64)
    kc, vc = k.clone(), v.clone()
    variant_lib.write_kv(nk, nv, kc, vc, slots, k_scale=K_SCALE, v_scale=V_SCALE)
    for cache, new, scale, before in ((kc, nk, K_SCALE, k), (vc, nv, V_SCALE, v)):
        flat, flat_before = cache.view(-1, 2, 64), before.view(-1, 2, 64)
        want = reference.quantize_kv(new, torch.float8_e4m3fn, scale)
        assert torch.equal(flat[slots].view(torch.uint8), want.view(torch.uint8))
        rest = torch.ones(flat.shape[0], dtype=torch.bool)
        rest[slots] = False
        assert torch.equal(flat[rest].view(torch.uint8), flat_before[rest].view(torch.uint8))
    src, dst = torch.tensor([int(bt[0, 0]), int(bt[2, 1])], dtype=torch.int32), torch.tensor(free[2:4],
                                                                                             dtype=torch.int32)
    variant_lib.copy_pages(kc, vc, src, dst)
    for cache in (kc, vc):
        assert torch.equal(cache[dst.long()].view(torch.uint8), cache[src.long()].view(torch.uint8))


@pytest.mark.parametrize("ask, pattern", [
    ({"window_left": 7}, r"^this library has no decode kernel with a sliding window \(window_left >= 0\) for "
                         r"float8_e4m3fn caches \(decode_e4m3_f32_h4x2_d64_p5_w\); it holds: "
                         r"decode_e4m3_f32_h4x2_d64_p5, decode_e4m3_f32_h4x2_d64_p5_w_cap; re-export with "
                         r"--variants w --kv-dtype float8_e4m3fn$"),
    ({"logits_soft_cap": 1.5}, r"no decode kernel with a logits soft-cap \(logits_soft_cap > 0\).*--variants cap"),
    ({**OPTIONS, "alibi_slopes": torch.ones(4)}, r"no decode kernel with a sliding window .* \+ a logits soft-cap "
                                                 r".* \+ ALiBi.*--variants w\+cap\+alibi"),
    ({"sinks": torch.zeros(4), "fp32": True}, r"no decode kernel with attention sinks \(sinks\) "
                                              r"\(decode_f32_h4x2_d64_p5_sink\); it holds: decode_f32_h4x2_d64_p5, "
                                              r"decode_f32_h4x2_d64_p5_w_cap; re-export with --variants sink$"),
    ({"e5m2": True}, r"^k_cache: dtype float8_e5m2 does not match .*float32, float8_e4m3fn.*--kv-dtype float8_e5m2"),
], ids=["window-only", "cap-only", "alibi", "sinks", "e5m2"])
def test_option_the_library_lacks_is_refused(variant_lib, ask, pattern):
    """A call whose options select a kernel the export lacks fails with a ValueError naming what was asked and
    what the library holds, before any kernel runs (the library's functions are never called, out untouched)."""
    ask = dict(ask)
    k, v, bt, sl, q, pq, cu = _fp8_data()
    if ask.pop("fp32", False):
        k, v = k.float(), v.float()
    if ask.pop("e5m2", False):
        k, v = k.float().to(torch.float8_e5m2), v.float().to(torch.float8_e5m2)
    calls = []
    functions = variant_lib._functions
    variant_lib._functions = {c: (lambda *a, _c=c, _f=f: calls.append(_c) or _f(*a)) for c, f in functions.items()}
    try:
        out = torch.full_like(q, 7.0)
        with pytest.raises(ValueError, match=pattern):
            variant_lib.paged_decode(q, k, v, bt, sl, out=out, **ask)
        pout = torch.full_like(pq, 7.0)
        with pytest.raises(ValueError, match=pattern.replace("decode", "prefill").lstrip("^")):
            variant_lib.paged_prefill(pq, k, v, bt, sl, cu, out=pout, **ask)
    finally:
        variant_lib._functions = functions
    assert not calls and bool((out == 7.0).all()) and bool((pout == 7.0).all())


def test_in_process_api_unaffected_by_a_loaded_library(lib):
    """use_kernels is scoped: after a library call, tp.* is back on compile-on-demand kernels."""
    lib.paged_decode(*_decode_args())
    assert tp.plan._KERNEL_PROVIDER.get() is None


# ------------------------------------------------------------------------------------------- inspector
def test_inspector_reads_device_code_formats():
    fat = bytearray(struct.pack("<IHHQ", 0xBA55ED50, 1, 16, 64))
    for kind, sm in ((2, 87), (1, 90)):
        entry = bytearray(32)
        struct.pack_into("<HHIQ", entry, 0, kind, 0, 32, 0)
        struct.pack_into("<I", entry, 28, sm)
        fat += entry
    info = B.classify_device_code(bytes(fat))
    assert info["format"] == "fatbin" and info["sm"] == [87, 90]
    assert [e["kind"] for e in info["entries"]] == ["cubin", "ptx"]
    elf = bytearray(64)
    elf[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<H", elf, 18, 190)
    struct.pack_into("<I", elf, 48, 0x06005704)
    assert B.classify_device_code(bytes(elf)) == {"format": "cubin", "sm": [87]}
    ptx = b"//\n.version 8.0\n.target sm_90a\n.address_size 64\n"
    assert B.classify_device_code(ptx) == {"format": "ptx", "sm": [90]}
    assert B.classify_device_code(b'extern "C" __global__ void k() {}')["format"] == "cuda-source"


def test_export_rejects_bad_config(tmp_path):
    with pytest.raises(ValueError, match="num_qo_heads"):
        E.export({**CFG, "num_qo_heads": 3}, "local", tmp_path)
    with pytest.raises(ValueError, match="target"):
        E.export(CFG, "no/such-tag", tmp_path)


# ------------------------------------------------------------------------------------------- CUDA exports
def _cuda_skip(cross: str | None = None):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on the PATH: CUDA device code can't be compiled")
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not on the PATH: the libcuda build stub can't be built")
    if cross and shutil.which(cross) is None:
        pytest.skip(f"{cross} is missing: run tools/setup_cross.sh")


# The CUDA exports carry variants too (through the stub process on a machine with no GPU).
H100_VARIANTS = ["--kv-dtype", "float8_e4m3fn", "--variants", "w+cap"]
ORIN_VARIANTS = ["--kv-dtype", "float8_e5m2", "--variant", "alibi+sink"]


@pytest.fixture(scope="module")
def h100_export(tmp_path_factory):
    _cuda_skip()
    out = tmp_path_factory.mktemp("export_h100")
    return out, _cli_export("nvidia/nvidia-h100", out, H100_VARIANTS)


@pytest.fixture(scope="module")
def orin_export(tmp_path_factory):
    _cuda_skip("aarch64-linux-gnu-gcc")
    out = tmp_path_factory.mktemp("export_orin")
    return out, _cli_export("nvidia/jetson-orin-nano", out, ORIN_VARIANTS)


def _check_cuda_export(out: Path, m: dict, machine: str, sm: int, kv_dtype: str, flags: dict):
    assert set(m["kernels"]) == _names(["float32", kv_dtype], [{}, flags])
    for name, info in m["kernels"].items():
        cfg = KernelConfig.from_name(name)
        assert info["params"] == SPECS[cfg.kernel].signature(cfg) and info["variants"] == list(cfg.variants)
    lib = out / m["library"]["file"]
    assert sorted(p.name for p in out.iterdir()) == sorted([E.MANIFEST, lib.name]), "only library + manifest"
    info = B.inspect_library(lib)  # read again, independent of the manifest
    assert info == m["contents"]
    assert info["elf_machine"] == machine and info["modules"] == ["_lib", "cuda"]
    (code,) = info["device_code"]
    assert code["format"] == "fatbin" and code["sm"] == [sm]
    assert {e["kind"] for e in code["entries"]} == {"cubin"}, "SASS only, no PTX or source"
    assert m["versions"]["nvcc"]


def test_h100_export_is_x86_64_with_sm90a_device_code(h100_export):
    out, m = h100_export
    assert m["target"]["arch"] == "sm_90a" and m["target"]["host_machine"] == "x86-64"
    _check_cuda_export(out, m, "x86-64", 90, "float8_e4m3fn", {"window": True, "soft_cap": True})
    assert '"mcpu"' not in json.dumps(json.loads(m["target"]["str"])["host"]), "host code must be generic x86-64"


def test_jetson_export_is_aarch64_with_sm87_device_code(orin_export):
    out, m = orin_export
    assert m["target"]["arch"] == "sm_87" and m["target"]["host_machine"] == "aarch64"
    _check_cuda_export(out, m, "aarch64", 87, "float8_e5m2", {"alibi": True, "sinks": True})
    if B.host_machine() != "aarch64":
        with pytest.raises(LoadError, match="built for aarch64"):
            load(out)


def test_cuda_library_refuses_cpu_tensors(h100_export):
    out, _ = h100_export
    if not shutil.which("nvidia-smi"):  # no CUDA driver here: loading needs TVM's CUDA runtime
        with pytest.raises(LoadError, match="CUDA runtime"):
            load(out)
    script = r'''
import torch
from tvm_paged.loader import load
lib = load(sys.argv[1])
q, k = torch.randn(2, 4, 64), torch.randn(6, 5, 2, 64)
try:
    lib.paged_decode(q, k, k.clone(), torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, dtype=torch.int32))
except ValueError as exc:
    print("decode refused:", exc)
try:
    lib.copy_pages(k, k.clone(), torch.tensor([0], dtype=torch.int32), torch.tensor([1], dtype=torch.int32))
except ValueError as exc:
    print("copy_pages refused:", exc)
'''
    # A stub libcuda lets TVM's CUDA runtime load (and the library deserialize) on a machine with no GPU; the
    # refusal must come before any kernel is launched.
    proc = T.run_python_with_cuda_stub(script, [out], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "decode refused: q: tensors on cpu" in proc.stdout
    assert "copy_pages refused: k_cache: tensors on cpu" in proc.stdout


@pytest.mark.parametrize("argv, message", [
    (["export", "-o", "{file}"], "-o/--output: {file} exists and is not a folder"),
    (["export", "-o", "{file}/sub"], "is not a folder"),
    (["export", "-o", "/proc/no-such-folder"], "-o/--output: cannot write in /proc"),
    (["export", "-o", "{tmp}/out", "--target", '{{"kind": "llvm", "mtriple": "bogus"}}'], "LLVM here has no 'bogus'"),
    (["export", "-o", "{tmp}/out", "--target", '{{"kind": "llvm", "mcpu": "bogus-cpu"}}'], "mcpu 'bogus-cpu'"),
    (["export", "-o", "{tmp}/out", "--page-size", "100000000"], "page_size must be at most 4096"),
    (["tune", "--schedules-dir", "{file}"], "--schedules-dir: {file} exists and is not a folder"),
    (["tune", "--work-dir", "/proc/no-such-folder"], "--work-dir: cannot write in /proc"),
    (["tune", "--repeat", "0"], "--repeat: must be >= 1"),
    (["tune", "--per-round", "-5"], "--per-round: must be >= 1"),
    (["tune", "--build-timeout", "-1"], "--build-timeout: must be > 0"),
    (["tune", "--pool-mb", "-1"], "--pool-mb: must be > 0"),
    (["tune", "--buckets", "100000x100000000"], "page-table entries, at most"),
])
def test_cli_refuses_bad_options_before_any_work(tmp_path, capsys, argv, message):
    """One line on stderr naming the option, a non-zero exit, nothing built or written (a compile or a tune that
    runs for hours must not fail at the end on a path; a bogus triple had crashed LLVM)."""
    from tvm_paged.cli import main

    afile = tmp_path / "afile"
    afile.write_text("x")
    fill = {"file": str(afile), "tmp": str(tmp_path)}
    assert main([a.format(**fill) for a in argv]) != 0
    err = capsys.readouterr().err
    assert message.format(**fill) in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("triple", ["aarch64-linux-gnu", "arm64-apple-macos", "armv7a-linux-gnueabihf",
                                    "i686-linux-gnu", "x86_64-linux-gnu", "riscv64-linux-gnu"])
def test_llvm_triples_of_known_architectures_resolve(triple):
    """Sub-architectures and aliases LLVM accepts (armv7a, i686, arm64) are not mistaken for unknown ones."""
    from tvm_paged import targets

    assert targets.resolve_target({"kind": "llvm", "mtriple": triple}).kind.name == "llvm"
