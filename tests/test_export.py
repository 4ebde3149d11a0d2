"""Export and load: round trips against the in-process kernels, refusals, and what cross exports hold.

One small configuration (float32, h4x2, d64, p5). The local CPU export is built once per module; the CUDA exports
(H100 on x86-64, Jetson Orin on aarch64) are built once each and skipped when the CUDA kernels, nvcc or the
cross toolchain are missing.
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
from tvm_paged import toolchain as T
from tvm_paged.spec import SPECS
from tvm_paged.loader import AbiMismatchError, IntegrityError, LoadError, load
from paged_data import make_pool, random_q

ROOT = Path(__file__).resolve().parents[1]
CFG = {"dtype": "float32", "num_qo_heads": 4, "num_kv_heads": 2, "head_dim": 64, "page_size": 5}
CLI_CFG = ["--dtype", "float32", "--num-qo-heads", "4", "--num-kv-heads", "2", "--head-dim", "64", "--page-size", "5"]


def _cli_export(target: str, out: Path) -> dict:
    parser = argparse.ArgumentParser()
    E.add_arguments(parser)
    assert E.run(parser.parse_args(["--target", target, *CLI_CFG, "-o", str(out)])) == 0
    return json.loads((out / E.MANIFEST).read_text())


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
    assert m["config"] == {"name": "f32_h4x2_d64_p5", **CFG}
    assert m["target"]["kind"] == "cpu" and m["target"]["spec"] == "local"
    assert m["versions"]["tvm"] and m["versions"]["tvm_ffi"]
    assert m["contents"] == {"elf_machine": B.host_machine(), "modules": [], "device_code": []}
    for name, info in m["kernels"].items():
        assert info["symbol"] == tp.KernelConfig("decode", **CFG).with_kernel(name).name
        assert [p["name"] for p in info["params"]] == list(SPECS[name].names)
        assert info["schedule"]["tuned"] in (True, False)
    q = m["kernels"]["decode"]["params"][0]
    assert q["shape"][1:] == [4, 64] and isinstance(q["shape"][0], str) and q["dtype"] == "float32"
    assert {"decode", "write_kv", "copy_pages"} <= set(m["kernels"])
    assert set(m["kernels"]) == {"decode", "prefill", "write_kv", "copy_pages"}


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
if "prefill" in lib.kernels:
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


@pytest.mark.parametrize("change", ["role", "dtype", "order", "kernel"])
def test_manifest_with_another_calling_convention_refused(local_export, tmp_path, change):
    """The loader binds arguments by the specs of this version: a library whose recorded parameters differ in
    role, dtype or order, or that lacks a kernel, is refused at load, before any call."""
    out, _ = local_export
    dst = _copy(out, tmp_path)
    manifest = json.loads((dst / E.MANIFEST).read_text())
    params = manifest["kernels"]["decode"]["params"]
    if change == "role":
        params[-2]["role"] = "output"  # lse_part: scratch
    elif change == "dtype":
        params[3]["dtype"] = "int64"  # block_table
    elif change == "order":
        params[1], params[2] = params[2], params[1]
    else:
        del manifest["kernels"]["copy_pages"]
    (dst / E.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(LoadError, match="re-export" if change != "kernel" else "holds kernels"):
        load(dst, verify=False)


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


@pytest.fixture(scope="module")
def h100_export(tmp_path_factory):
    _cuda_skip()
    out = tmp_path_factory.mktemp("export_h100")
    return out, _cli_export("nvidia/nvidia-h100", out)


@pytest.fixture(scope="module")
def orin_export(tmp_path_factory):
    _cuda_skip("aarch64-linux-gnu-gcc")
    out = tmp_path_factory.mktemp("export_orin")
    return out, _cli_export("nvidia/jetson-orin-nano", out)


def _check_cuda_export(out: Path, m: dict, machine: str, sm: int):
    lib = out / m["library"]["file"]
    assert sorted(p.name for p in out.iterdir()) == sorted([E.MANIFEST, lib.name]), "only library + manifest"
    info = B.inspect_library(lib)  # read again, independent of the manifest
    assert info == m["contents"]
    assert info["elf_machine"] == machine and info["modules"] == ["_lib", "cuda"]
    (code,) = info["device_code"]
    assert code["format"] == "fatbin" and code["sm"] == [sm]
    assert {e["kind"] for e in code["entries"]} == {"cubin"}, "SASS only, no PTX or source"
    assert {"decode", "write_kv", "copy_pages"} <= set(m["kernels"])
    assert m["versions"]["nvcc"]


def test_h100_export_is_x86_64_with_sm90a_device_code(h100_export):
    out, m = h100_export
    assert m["target"]["arch"] == "sm_90a" and m["target"]["host_machine"] == "x86-64"
    _check_cuda_export(out, m, "x86-64", 90)
    assert '"mcpu"' not in json.dumps(json.loads(m["target"]["str"])["host"]), "host code must be generic x86-64"


def test_jetson_export_is_aarch64_with_sm87_device_code(orin_export):
    out, m = orin_export
    assert m["target"]["arch"] == "sm_87" and m["target"]["host_machine"] == "aarch64"
    _check_cuda_export(out, m, "aarch64", 87)
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
