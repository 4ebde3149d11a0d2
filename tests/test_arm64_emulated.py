"""aarch64 CPU exports run under emulation: an export for a Cortex-A78 (Orin's cores) is loaded in an arm64 Debian
root under qemu-user-static (``tools/setup_arm64.sh``) with TVM's runtime and numpy alone, and its kernels are
compared there with float64 references computed on the host (npz in, npz out). Correctness only: speed under
emulation means nothing. Skipped, with the reason, when the root or the cross compiler is absent.

The kernels are called through TVM's runtime directly, with the argument order of ``tvm_paged.spec``: the
package's own ``tp.load`` path still needs torch, which the root (like an edge device) does not have.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tvm_paged import export, reference
from tvm_paged.config import KernelConfig
from tvm_paged.spec import DECODE, PREFILL, WRITE_KV, COPY_PAGES

from paged_data import make_pool, random_q

ROOT = Path(os.environ.get("ARM64_ROOT", Path.home() / ".cache" / "tvm_paged" / "arm64-root"))
TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78"}
HQ, HKV, D, S = 8, 2, 64, 5
E4M3 = torch.float8_e4m3fn

# Runs inside the root: loads the library, calls each listed kernel on the npz's arrays (arguments by name, in the
# spec's order), writes the outputs back.
DEVICE_SCRIPT = r"""
import json, sys
import numpy as np, tvm
calls = json.load(open("/work/calls.json"))
data = dict(np.load("/work/in.npz"))
mod = tvm.runtime.load_module("/work/lib.so")
dev = tvm.cpu()
out = {}
for call in calls:
    arrays = {}
    args = []
    for name, kind in call["args"]:
        if kind == "scalar":
            args.append(call["scalars"][name])
        else:
            arrays[name] = tvm.runtime.tensor(np.ascontiguousarray(data[call["prefix"] + name]), dev)
            args.append(arrays[name])
    mod[call["symbol"]](*args)
    for name in call["outputs"]:
        out[call["prefix"] + name] = arrays[name].numpy()
np.savez("/work/out.npz", **out)
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
def library(tmp_path_factory):
    out = tmp_path_factory.mktemp("a64")
    manifest = export.export(KernelConfig("decode", "float32", HQ, HKV, D, S), TARGET, out,
                             kv_dtypes=["float8_e4m3fn"], variants=[("w",)])
    return out / manifest["library"]["file"], manifest


def _call(spec, cfg, prefix, scalars, outputs):
    """One kernel call of the device script: its symbol, its arguments in the spec's order (tensors by prefixed
    name in the npz), its scalar values and the outputs to send back."""
    return {"symbol": cfg.name, "prefix": prefix, "scalars": scalars, "outputs": outputs,
            "args": [[p.name, "scalar" if p.role == "scalar" else "tensor"] for p in spec.params_for(cfg)]}


def _run_on_device(lib: Path, calls: list, arrays: dict) -> dict:
    """Run ``calls`` in the arm64 root on ``arrays`` (name -> numpy); returns the outputs by prefixed name."""
    import json  # noqa: PLC0415

    work = ROOT / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        shutil.copy(lib, work / "lib.so")
        (work / "calls.json").write_text(json.dumps(calls))
        (work / "run.py").write_text(DEVICE_SCRIPT)
        np.savez(work / "in.npz", **arrays)
        proc = subprocess.run(["chroot", str(ROOT), "/opt/venv/bin/python", "/work/run.py"], capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return dict(np.load(work / "out.npz"))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_aarch64_export_matches_float64_under_emulation(library):
    lib, manifest = library
    assert manifest["target"]["host_machine"] == "aarch64"
    lens, q_lens = [1, 54, 97, 6, 23], [1, 10, 17, 6, 2]
    k, v, bt, sl = make_pool(lens, page_size=S, num_kv_heads=HKV, head_dim=D)  # NaN in every unused slot
    kq = reference.quantize_kv(k.reshape(-1, HKV, D), E4M3, 0.5).reshape(k.shape)
    vq = reference.quantize_kv(v.reshape(-1, HKV, D), E4M3, 0.5).reshape(v.shape)
    scales = np.full(HKV, 0.5, np.float32)
    b = len(lens)
    q = random_q(b, HQ, D, seed=3)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    qp = random_q(int(cu[-1]), HQ, D, seed=4)
    tiles = np.array([(i, r, min(r + 16, n)) for i, n in enumerate(q_lens) for r in range(0, n, 16)], np.int32)
    arrays, calls, expect = {}, [], {}

    def decode(prefix, cfg, kc, vc, opts, extra=None, scalars=None):
        """Queue a decode call (and its plain reference, replaced below for the 8-bit one)."""
        arrays.update({prefix + "q": q.numpy(), prefix + "k_cache": kc, prefix + "v_cache": vc,
                       prefix + "block_table": bt.numpy(), prefix + "seq_lens": sl.numpy(),
                       prefix + "out": np.zeros((b, HQ, D), np.float32), prefix + "lse": np.zeros((b, HQ), np.float32),
                       prefix + "o_part": np.zeros((b, 1, HQ, D), np.float32),
                       prefix + "ms_part": np.zeros((b, 1, HQ, 2), np.float32)})
        arrays.update({prefix + n: a for n, a in (extra or {}).items()})
        calls.append(_call(DECODE, cfg, prefix, {"scale": D ** -0.5, "split_pages": 0, **(scalars or {})},
                           ["out", "lse"]))
        expect[prefix] = reference.decode(q, *opts)

    decode("d_", KernelConfig("decode", "float32", HQ, HKV, D, S), k.numpy(), v.numpy(), (k, v, bt, sl))
    decode("f_", KernelConfig("decode", "float32", HQ, HKV, D, S, "float8_e4m3fn", window=True),
           kq.view(torch.uint8).numpy(), vq.view(torch.uint8).numpy(), (kq, vq, bt, sl),
           {"k_scale": scales, "v_scale": scales}, {"window_left": 20})
    expect["f_"] = reference.decode(q, kq, vq, bt, sl, k_scale=0.5, v_scale=0.5, window_left=20)
    pcfg = KernelConfig("prefill", "float32", HQ, HKV, D, S)
    arrays.update({"p_q": qp.numpy(), "p_k_cache": k.numpy(), "p_v_cache": v.numpy(), "p_block_table": bt.numpy(),
                   "p_seq_lens": sl.numpy(), "p_cu_seqlens_q": cu, "p_tiles": tiles,
                   "p_out": np.zeros(tuple(qp.shape), np.float32), "p_lse": np.zeros(tuple(qp.shape[:2]), np.float32)})
    calls.append(_call(PREFILL, pcfg, "p_", {"scale": D ** -0.5, "causal": 1}, ["out", "lse"]))
    expect["p_"] = reference.prefill(qp, k, v, bt, sl, torch.from_numpy(cu))
    # write_kv into an e4m3 cache, then copy_pages of it
    new = torch.randn(7, HKV, D) * 40
    slots = np.array([0, 3, 9, -1, 12, 20, 24], np.int64)
    cache = np.full((6, S, HKV, D), 0x7F, np.uint8)  # NaN codes where nothing is written
    arrays.update({"w_k": new.numpy(), "w_v": new.numpy(), "w_k_cache": cache, "w_v_cache": cache.copy(),
                   "w_slot_mapping": slots, "w_k_scale": scales, "w_v_scale": scales * 2})
    calls.append(_call(WRITE_KV, KernelConfig.for_pages("write_kv", "float32", HKV, D, S, "float8_e4m3fn"), "w_",
                       {}, ["k_cache", "v_cache"]))
    arrays.update({"c_k_cache": cache.copy(), "c_v_cache": np.arange(cache.size, dtype=np.uint8).reshape(cache.shape),
                   "c_src_pages": np.array([0, 2], np.int32), "c_dst_pages": np.array([4, 5], np.int32)})
    calls.append(_call(COPY_PAGES, KernelConfig.for_pages("copy_pages", "float8_e4m3fn", HKV, D, S), "c_", {},
                       ["k_cache", "v_cache"]))

    got = _run_on_device(lib, calls, arrays)
    for prefix, (ref_out, ref_lse) in expect.items():
        out = got[prefix + "out"].astype(np.float64)
        assert not np.isnan(out).any(), prefix
        assert np.abs(out - ref_out.numpy()).max() < 2e-5, prefix
        assert np.abs(got[prefix + "lse"] - ref_lse.numpy()).max() < 2e-5, prefix
    want_k = reference.quantize_kv(new, E4M3, torch.from_numpy(scales)).view(torch.uint8).numpy()
    want_v = reference.quantize_kv(new, E4M3, torch.from_numpy(scales * 2)).view(torch.uint8).numpy()
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
