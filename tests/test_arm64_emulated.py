"""aarch64 exports under emulation, through tvm_paged's own API on an edge device's software: an arm64 Debian root
under qemu-user-static (``tools/setup_arm64.sh``) with TVM's runtime, numpy and ml_dtypes and no torch.

The package's source is copied into the root and put on its ``PYTHONPATH``; there ``tvm_paged.load`` opens an
export for a Cortex-A78 (Orin's cores) and runs decode (plain, and e4m3 caches with a sliding window and
per-head scales), prefill, write_kv (e4m3) and copy_pages on numpy arrays, compared with float64 references
computed on the host (npz in, npz out). The Jetson Orin export (CUDA kernels, aarch64 host code) is loaded
there too and refused with a :class:`~tvm_paged.loader.LoadError` saying why: the root has no CUDA driver.
Correctness only: speed under emulation means nothing. Skipped, with the reason, when the root or the cross
compiler is absent (the Jetson check alone when nvcc is).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import tvm_paged
from tvm_paged import export, reference
from tvm_paged.config import KernelConfig

from paged_data import make_pool, random_q

ROOT = Path(os.environ.get("ARM64_ROOT", Path.home() / ".cache" / "tvm_paged" / "arm64-root"))
TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78"}
HQ, HKV, D, S = 8, 2, 64, 5
E4M3 = torch.float8_e4m3fn

PACKAGE = Path(tvm_paged.__file__).resolve().parent
WINDOW = 20

# Runs inside the root, with torch blocked as well as absent: loads the CPU export with tvm_paged, runs the calls
# on the npz's arrays (8-bit caches as their codes, viewed as ml_dtypes' e4m3), writes the results back, then
# tries the Jetson export and prints what happened as JSON.
DEVICE_SCRIPT = r"""
import json, platform, sys
sys.modules["torch"] = None
import ml_dtypes
import numpy as np
import tvm_paged as tp
from tvm_paged.loader import LoadError

d = dict(np.load("/work/in.npz"))
e4m3 = lambda a: a.view(ml_dtypes.float8_e4m3fn)
lib = tp.load("/work/cpu")
out = {}
out["d_out"], out["d_lse"] = lib.paged_decode(d["q"], d["k"], d["v"], d["bt"], d["sl"], return_lse=True)
out["f_out"], out["f_lse"] = lib.paged_decode(d["q"], e4m3(d["k8"]), e4m3(d["v8"]), d["bt"], d["sl"],
                                              window_left=int(d["window"]), k_scale=d["scales"],
                                              v_scale=d["scales"], return_lse=True)
out["p_out"], out["p_lse"] = lib.paged_prefill(d["qp"], d["k"], d["v"], d["bt"], d["sl"], d["cu"], return_lse=True)
wk, wv = e4m3(d["w_cache"].copy()), e4m3(d["w_cache"].copy())
lib.write_kv(d["new"], d["new"], wk, wv, d["slots"], k_scale=d["scales"], v_scale=d["scales"] * 2)
ck, cv = e4m3(d["c_k_cache"].copy()), e4m3(d["c_v_cache"].copy())
lib.copy_pages(ck, cv, d["src"], d["dst"])
out.update(w_k_cache=wk.view(np.uint8), w_v_cache=wv.view(np.uint8), c_k_cache=ck.view(np.uint8),
           c_v_cache=cv.view(np.uint8))
seen = {"machine": platform.machine(), "types": sorted({type(a).__name__ for a in out.values()}),
        "torch_modules": sorted(m for m, mod in sys.modules.items() if m.split(".")[0] == "torch" and mod)}
try:
    seen["jetson"] = repr(tp.load("/work/jetson")) if len(sys.argv) > 1 else None
except LoadError as exc:
    seen["jetson"] = f"{type(exc).__name__}: {exc}"
np.savez("/work/out.npz", **out)
print(json.dumps(seen))
"""


def _skip_reason() -> str | None:
    if not (ROOT / ".tvm_paged-ready").is_file():
        return f"no arm64 root at {ROOT}: run tools/setup_arm64.sh"
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        return "aarch64-linux-gnu-gcc is missing: run tools/setup_cross.sh"
    if os.geteuid() != 0:
        return "chroot into the arm64 root needs root"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    """The Cortex-A78 export: float32, e4m3 caches besides float32 ones, the window variant besides none."""
    out = tmp_path_factory.mktemp("a64")
    manifest = export.export(KernelConfig("decode", "float32", HQ, HKV, D, S), TARGET, out,
                             kv_dtypes=["float8_e4m3fn"], variants=[("w",)])
    assert manifest["target"]["host_machine"] == "aarch64"
    return out


@pytest.fixture(scope="module")
def jetson_library(tmp_path_factory) -> Path | None:
    """The Jetson Orin export of the same configuration (plain kernels only), None without nvcc (or the gcc that
    builds the libcuda stub a CUDA export compiles under)."""
    if shutil.which("nvcc") is None or shutil.which("gcc") is None:
        return None
    out = tmp_path_factory.mktemp("a64_jetson")
    manifest = export.export(KernelConfig("decode", "float32", HQ, HKV, D, S), "nvidia/jetson-orin-nano", out)
    assert manifest["target"]["kind"] == "cuda" and manifest["target"]["host_machine"] == "aarch64"
    return out


def _run_on_device(lib: Path, jetson: Path | None, arrays: dict) -> tuple[dict, dict]:
    """Run DEVICE_SCRIPT in the arm64 root on ``arrays`` (name -> numpy), with the tvm_paged source and the
    exports copied in; returns (what it printed, its outputs by name)."""
    work = ROOT / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        shutil.copytree(PACKAGE, work / "pkg" / "tvm_paged", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        shutil.copytree(lib, work / "cpu")
        if jetson is not None:
            shutil.copytree(jetson, work / "jetson")
        (work / "run.py").write_text(DEVICE_SCRIPT)
        np.savez(work / "in.npz", **arrays)
        cmd = ["chroot", str(ROOT), "/usr/bin/env", "PYTHONPATH=/work/pkg", "/opt/venv/bin/python", "/work/run.py"]
        proc = subprocess.run(cmd + (["jetson"] if jetson is not None else []), capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1]), dict(np.load(work / "out.npz"))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _inputs() -> tuple[dict, dict]:
    """(arrays for the device script, host-side tensors for the references)."""
    lens, q_lens = [1, 54, 97, 6, 23], [1, 10, 17, 6, 2]
    k, v, bt, sl = make_pool(lens, page_size=S, num_kv_heads=HKV, head_dim=D)  # NaN in every unused slot
    scales = np.array([0.5, 0.25], np.float32)  # per KV head
    k8 = reference.quantize_kv(k.reshape(-1, HKV, D), E4M3, torch.from_numpy(scales)).reshape(k.shape)
    v8 = reference.quantize_kv(v.reshape(-1, HKV, D), E4M3, torch.from_numpy(scales)).reshape(v.shape)
    q = random_q(len(lens), HQ, D, seed=3)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    qp = random_q(int(cu[-1]), HQ, D, seed=4)
    new = torch.randn(7, HKV, D, generator=torch.Generator().manual_seed(5)) * 40
    cache = np.full((6, S, HKV, D), 0x7F, np.uint8)  # NaN codes where nothing is written
    arrays = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "k8": k8.view(torch.uint8).numpy(),
              "v8": v8.view(torch.uint8).numpy(), "bt": bt.numpy(), "sl": sl.numpy(), "cu": cu, "qp": qp.numpy(),
              "window": np.array(WINDOW), "scales": scales, "new": new.numpy(),
              "slots": np.array([0, 3, 9, -1, 12, 20, 24], np.int64), "w_cache": cache,
              "c_k_cache": cache.copy(), "c_v_cache": np.arange(cache.size, dtype=np.uint8).reshape(cache.shape),
              "src": np.array([0, 2], np.int32), "dst": np.array([4, 5], np.int32)}
    host = {"q": q, "qp": qp, "k": k, "v": v, "k8": k8, "v8": v8, "bt": bt, "sl": sl, "new": new, "scales": scales}
    return arrays, host


@pytest.fixture(scope="module")
def device_run(library, jetson_library):
    arrays, host = _inputs()
    seen, got = _run_on_device(library, jetson_library, arrays)
    return seen, got, arrays, host


def test_aarch64_export_matches_float64_under_emulation(device_run):
    seen, got, arrays, h = device_run
    assert seen["machine"] == "aarch64" and seen["torch_modules"] == [] and seen["types"] == ["ndarray"]
    scales = torch.from_numpy(h["scales"])
    expect = {"d_": reference.decode(h["q"], h["k"], h["v"], h["bt"], h["sl"]),
              "f_": reference.decode(h["q"], h["k8"], h["v8"], h["bt"], h["sl"], k_scale=scales, v_scale=scales,
                                     window_left=WINDOW),
              "p_": reference.prefill(h["qp"], h["k"], h["v"], h["bt"], h["sl"], torch.from_numpy(arrays["cu"]))}
    for prefix, (ref_out, ref_lse) in expect.items():
        out = got[prefix + "out"].astype(np.float64)
        assert not np.isnan(out).any(), prefix
        assert np.abs(out - ref_out.numpy()).max() < 2e-5, prefix
        assert np.abs(got[prefix + "lse"] - ref_lse.numpy()).max() < 2e-5, prefix
    # write_kv into an e4m3 cache: the reference's codes in the live slots, the NaN fill elsewhere
    slots = arrays["slots"]
    want_k = reference.quantize_kv(h["new"], E4M3, scales).view(torch.uint8).numpy()
    want_v = reference.quantize_kv(h["new"], E4M3, scales * 2).view(torch.uint8).numpy()
    flat_k = got["w_k_cache"].reshape(-1, HKV, D)
    flat_v = got["w_v_cache"].reshape(-1, HKV, D)
    live = slots >= 0
    assert np.array_equal(flat_k[slots[live]], want_k[live]) and np.array_equal(flat_v[slots[live]], want_v[live])
    untouched = np.setdiff1d(np.arange(flat_k.shape[0]), slots[live])
    assert (flat_k[untouched] == 0x7F).all()
    ck, cv = got["c_k_cache"], got["c_v_cache"]  # copy_pages: pages 0 and 2 to 4 and 5, bytes exact
    src_v = arrays["c_v_cache"]
    assert np.array_equal(cv[4], src_v[0]) and np.array_equal(cv[5], src_v[2]) and np.array_equal(cv[:4], src_v[:4])
    assert np.array_equal(ck, arrays["c_k_cache"])


def test_jetson_export_refused_without_cuda(device_run):
    """The Jetson library passes every check an aarch64 device can make (architecture, versions, manifest) and is
    then refused, before TVM opens it, because this "device" has no CUDA driver."""
    seen = device_run[0]
    if seen["jetson"] is None:
        pytest.skip("nvcc or gcc is not on the PATH: no Jetson export to load")
    assert seen["jetson"].startswith("LoadError: /work/jetson/"), seen["jetson"]
    assert "holds CUDA kernels, but TVM's CUDA runtime is not available" in seen["jetson"]
    assert "libcuda.so.1" in seen["jetson"]
