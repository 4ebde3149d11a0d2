"""The functional API on numpy arrays with TVM's runtime alone: what an edge device without torch runs.

(a) A child process with torch blocked (``sys.modules["torch"] = None``) imports tvm_paged, loads a CPU export
built here and runs decode (plain; 8-bit e4m3 caches as ml_dtypes arrays with a sliding window and per-tensor
and per-head scales), prefill, write_kv (float16 and e4m3) and copy_pages on numpy arrays of odd sizes (17
sequences, lengths up to 97, page size 5, NaN in every unused cache slot); the results are compared here with
float64 references (npz in, npz out). (b) In process, numpy inputs give numpy results bitwise equal to torch
inputs' (bfloat16 as ml_dtypes' bfloat16), and the mixed-input rule holds: any torch tensor makes a torch call.
(c) Bad numpy inputs are refused with the ValueError naming the argument, before any kernel runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

import tvm_paged as tp
from tvm_paged import export, reference
from tvm_paged.config import KernelConfig
from paged_data import ATOL, LSE_ATOL, assert_close, cpu_only, make_pool, quantize_pool, random_q

pytestmark = cpu_only

HQ, HKV, D, S = 4, 2, 64, 5
CFG = KernelConfig("decode", "float16", HQ, HKV, D, S)
E4M3 = torch.float8_e4m3fn
# 17 sequences, one of 97 tokens, one of 1; prefill's query rows per sequence (each at most its length).
LENS = [97, 1, 5, 6, 33, 12, 64, 2, 41, 7, 19, 3, 88, 10, 4, 50, 26]
Q_LENS = [9, 1, 5, 1, 17, 3, 1, 2, 8, 7, 1, 3, 20, 2, 4, 1, 6]
WINDOW = 20
V_SCALE = np.array([0.25, 0.75], np.float32)  # per KV head
SRC, DST = [0, 3, 7], [-1, -2, -3]  # page copies (destinations counted from the pool's end)


def _bits(x: torch.Tensor) -> np.ndarray:
    """A torch tensor's values as numpy: float8 as its uint8 codes (npz files hold no ml_dtypes dtype)."""
    return x.view(torch.uint8).numpy() if x.dtype == E4M3 else x.numpy()


def _numpy(x: torch.Tensor) -> np.ndarray:
    """A torch tensor as the numpy array an edge device would hold: bfloat16 and float8 as ml_dtypes'."""
    if x.dtype == torch.bfloat16:
        return x.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    if x.dtype == E4M3:
        return x.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    return x.numpy()


def _same(a, b) -> bool:
    """Bitwise equal (NaN codes included), whatever the array library."""
    a, b = (x.view(torch.uint8).numpy() if isinstance(x, torch.Tensor) else np.asarray(x).view(np.uint8)
            for x in (a, b))
    return a.shape == b.shape and np.array_equal(a, b)


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    """A local CPU export of CFG with e4m3 caches and the window variant besides the plain kernels."""
    out = tmp_path_factory.mktemp("numpy_runtime")
    export.export(CFG, "local", out, kv_dtypes=["float8_e4m3fn"], variants=[("w",)])
    return out


@pytest.fixture(scope="module")
def data() -> dict:
    """Inputs (torch, float16; e4m3 caches quantized from the same pool) of every call the tests make."""
    k, v, bt, sl = make_pool(LENS, page_size=S, num_kv_heads=HKV, head_dim=D, dtype="float16", seed=7)
    k8, v8 = quantize_pool(k.float().clamp(-3, 3), v.float().clamp(-3, 3), "float8_e4m3fn", 0.5,
                           torch.from_numpy(V_SCALE))
    cu = torch.tensor(np.concatenate([[0], np.cumsum(Q_LENS)]), dtype=torch.int32)
    gen = torch.Generator().manual_seed(11)
    num_pages = k.shape[0]
    slots = torch.randperm(num_pages * S, generator=gen)[:23]
    slots[5] = -1  # a padding token
    new = (torch.randn(23, HKV, D, generator=gen) * 3).to(torch.float16)
    return dict(q=random_q(len(LENS), HQ, D, "float16", seed=3), k=k, v=v, k8=k8, v8=v8, bt=bt, sl=sl, cu=cu,
                qp=random_q(int(cu[-1]), HQ, D, "float16", seed=4), new_k=new, new_v=new * -0.5,
                slots=slots.to(torch.int64), k_scale_w=torch.tensor([0.5, 2.0]), num_pages=num_pages,
                src=torch.tensor(SRC, dtype=torch.int32), dst=torch.tensor([num_pages + i for i in DST],
                                                                           dtype=torch.int32))


# ------------------------------------------------------------------------------ (a) torch-less child process
# Runs with torch blocked: loads the export, runs every call on the npz's arrays, writes the results, and prints
# what it saw (result types, refusals, which torch modules got imported) as JSON.
CHILD = r"""
import json, sys
sys.modules["torch"] = None  # an edge device: TVM's runtime, numpy and ml_dtypes only
import ml_dtypes
import numpy as np
import tvm_paged as tp

lib = tp.load(sys.argv[1])
d = dict(np.load(sys.argv[2]))
e4m3 = lambda a: a.view(ml_dtypes.float8_e4m3fn)


def read_only(a):
    a = a.copy()
    a.flags.writeable = False
    return a


out, seen = {}, {}
out["d_out"], out["d_lse"] = lib.paged_decode(d["q"], d["k"], d["v"], d["bt"], d["sl"], return_lse=True)
out["f_out"], out["f_lse"] = lib.paged_decode(d["q"], e4m3(d["k8"]), e4m3(d["v8"]), d["bt"], d["sl"],
                                              window_left=int(d["window"]), k_scale=0.5, v_scale=d["v_scale"],
                                              return_lse=True)
out["p_out"], out["p_lse"] = lib.paged_prefill(d["qp"], d["k"], d["v"], d["bt"], d["sl"], d["cu"], return_lse=True)
seen["types"] = sorted({f"{type(a).__module__}.{type(a).__name__} {a.dtype}" for a in out.values()})
kc, vc = d["k"].copy(), d["v"].copy()
lib.write_kv(d["new_k"], d["new_v"], kc, vc, d["slots"])
k8, v8 = e4m3(np.full_like(d["k8"], 0x7F)), e4m3(np.full_like(d["v8"], 0x7F))  # NaN codes where nothing is written
lib.write_kv(d["new_k"], d["new_v"], k8, v8, d["slots"], k_scale=d["k_scale_w"], v_scale=0.25)
lib.copy_pages(kc, vc, d["src"], d["dst"])
lib.copy_pages(k8, v8, d["src"], d["dst"])
out.update(w_k=kc, w_v=vc, w8_k=k8.view(np.uint8), w8_v=v8.view(np.uint8))
refusals = {
    "q": lambda: lib.paged_decode(d["q"].astype(np.float64), d["k"], d["v"], d["bt"], d["sl"]),
    "k_cache": lambda: lib.write_kv(d["new_k"], d["new_v"], read_only(d["k"]), d["v"], d["slots"]),
    "block_table": lambda: lib.paged_decode(d["q"], d["k"], d["v"], d["bt"] + 1000, d["sl"]),
    "v_cache": lambda: lib.paged_decode(d["q"], d["k"], d["v"].tolist(), d["bt"], d["sl"]),
}
seen["refused"] = {}
for name, call in refusals.items():
    try:
        call()
        seen["refused"][name] = None
    except ValueError as exc:
        seen["refused"][name] = str(exc)
seen["torch_modules"] = sorted(m for m, mod in sys.modules.items() if m.split(".")[0] == "torch" and mod is not None)
np.savez(sys.argv[3], **out)
print(json.dumps(seen))
"""


RUNTIME_MODULES = ("ops", "plan", "validate", "loader", "allocator", "spec", "config", "binary", "tvm_compat",
                   "targets", "arrays")


def test_runtime_modules_import_without_torch():
    """The runtime API imports with torch blocked; only the torch-based KV cache (lazy) needs it."""
    script = (
        "import importlib, sys\n"
        "sys.modules['torch'] = None\n"
        "import tvm_paged as tp\n"
        f"for m in {RUNTIME_MODULES!r}:\n"
        "    importlib.import_module('tvm_paged.' + m)\n"
        "try:\n"
        "    tp.PagedKVCache\n"
        "except ImportError:\n"
        "    print('PagedKVCache needs torch')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "PagedKVCache needs torch"


def _child_inputs(data: dict) -> dict:
    names = ("q", "k", "v", "k8", "v8", "bt", "sl", "cu", "qp", "new_k", "new_v", "slots", "k_scale_w", "src", "dst")
    return {**{n: _bits(data[n]) for n in names}, "window": np.array(WINDOW), "v_scale": V_SCALE}


@pytest.fixture(scope="module")
def child_run(library, data, tmp_path_factory):
    work = tmp_path_factory.mktemp("numpy_child")
    np.savez(work / "in.npz", **_child_inputs(data))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(library), str(work / "in.npz"), str(work / "out.npz")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), dict(np.load(work / "out.npz"))


def test_child_imports_no_torch_and_gets_numpy(child_run):
    seen, _ = child_run
    assert seen["torch_modules"] == []
    assert seen["types"] == ["numpy.ndarray float16", "numpy.ndarray float32"]


def test_child_attention_matches_float64(child_run, data):
    _, got = child_run
    d = data
    checks = {
        "d_": reference.decode(d["q"], d["k"], d["v"], d["bt"], d["sl"]),
        "f_": reference.decode(d["q"], d["k8"], d["v8"], d["bt"], d["sl"], window_left=WINDOW, k_scale=0.5,
                               v_scale=torch.from_numpy(V_SCALE)),
        "p_": reference.prefill(d["qp"], d["k"], d["v"], d["bt"], d["sl"], d["cu"]),
    }
    for prefix, (ref_out, ref_lse) in checks.items():
        assert_close(got[prefix + "out"], ref_out, ATOL["float16"], prefix + "out")
        assert_close(got[prefix + "lse"], ref_lse, LSE_ATOL["float16"], prefix + "lse")


def _expected_caches(data: dict) -> dict:
    """The caches after write_kv then copy_pages, by plain indexing: float16 exactly, e4m3 as reference codes."""
    live = data["slots"] >= 0
    slots = data["slots"][live]
    kc, vc = data["k"].clone(), data["v"].clone()
    kc.view(-1, HKV, D)[slots] = data["new_k"][live]
    vc.view(-1, HKV, D)[slots] = data["new_v"][live]
    k8 = torch.full(data["k8"].shape, 0x7F, dtype=torch.uint8)
    v8 = k8.clone()
    k8.view(-1, HKV, D)[slots] = reference.quantize_kv(data["new_k"], E4M3, data["k_scale_w"]).view(torch.uint8)[live]
    v8.view(-1, HKV, D)[slots] = reference.quantize_kv(data["new_v"], E4M3, 0.25).view(torch.uint8)[live]
    src, dst = data["src"].long(), data["dst"].long()
    for cache in (kc, vc, k8, v8):
        cache[dst] = cache[src]
    return {"w_k": kc, "w_v": vc, "w8_k": k8, "w8_v": v8}


def test_child_page_ops_match_indexing(child_run, data):
    _, got = child_run
    for name, want in _expected_caches(data).items():
        assert _same(got[name], want), name


def test_child_refusals_name_the_argument(child_run, data):
    seen, _ = child_run
    refused = seen["refused"]
    assert refused["q"].startswith("q: dtype float64"), refused["q"]
    assert refused["k_cache"] == "k_cache: the array is read-only, and it is written in place"
    assert refused["block_table"].startswith("block_table: block_table[0, 0] = "), refused["block_table"]
    assert f"outside [0, num_pages = {data['num_pages']})" in refused["block_table"]
    assert refused["v_cache"] == "v_cache: expected a numpy.ndarray, got list"


# ------------------------------------------------------------------------------ (b) numpy in, numpy out, in process
@pytest.fixture(scope="module")
def lib(library):
    return tp.load(library)


def _attention_calls(lib, d: dict) -> dict:
    """Every attention call of the child's, on the arrays ``d`` (all torch or all numpy)."""
    return {
        "decode": lib.paged_decode(d["q"], d["k"], d["v"], d["bt"], d["sl"], return_lse=True),
        "fp8": lib.paged_decode(d["q"], d["k8"], d["v8"], d["bt"], d["sl"], window_left=WINDOW, k_scale=0.5,
                                v_scale=d["v_scale"], return_lse=True),
        "prefill": lib.paged_prefill(d["qp"], d["k"], d["v"], d["bt"], d["sl"], d["cu"], return_lse=True),
    }


def _as_numpy(data: dict) -> dict:
    return {n: (_numpy(x) if isinstance(x, torch.Tensor) else x) for n, x in data.items()}


def test_numpy_attention_returns_numpy_bitwise_equal_to_torch(lib, data):
    torch_in = {**data, "v_scale": torch.from_numpy(V_SCALE)}
    from_torch = _attention_calls(lib, torch_in)
    from_numpy = _attention_calls(lib, _as_numpy(torch_in))
    for name in from_torch:
        (t_out, t_lse), (n_out, n_lse) = from_torch[name], from_numpy[name]
        assert isinstance(t_out, torch.Tensor) and isinstance(n_out, np.ndarray) and isinstance(n_lse, np.ndarray)
        assert n_out.dtype == np.float16 and n_lse.dtype == np.float32, name
        assert _same(n_out, t_out) and _same(n_lse, t_lse), name


def test_numpy_plan_and_run(lib, data):
    """plan_decode on numpy tables holds numpy tables; its runs take numpy operands (numpy results, the binding
    reused) and torch CPU operands (torch results, the tables viewed zero copy), bitwise alike."""
    n = _as_numpy(data)
    plan = lib.plan_decode(n["bt"], n["sl"], num_pages=data["num_pages"])
    assert isinstance(plan.block_table, np.ndarray) and isinstance(plan.seq_lens, np.ndarray)
    first = lib.run_decode(plan, n["q"], n["k"], n["v"])
    again = lib.run_decode(plan, n["q"], n["k"], n["v"], out=np.empty_like(n["q"]))
    on_torch = lib.run_decode(plan, data["q"], data["k"], data["v"])
    assert len(plan.bindings) == 2  # one per library
    assert isinstance(first, np.ndarray) and isinstance(on_torch, torch.Tensor)
    assert _same(first, again) and _same(first, on_torch)


def test_numpy_page_ops_write_in_place_bitwise_like_torch(lib, data):
    t = {name: data[name].clone() for name in ("k", "v")}
    t8 = {name: torch.full(data["k8"].shape, 0x7F, dtype=torch.uint8).view(E4M3) for name in ("k", "v")}
    n = {name: _numpy(x.clone()) for name, x in t.items()}
    n8 = {name: _numpy(x.clone()) for name, x in t8.items()}
    nd = _as_numpy(data)
    for caches, d in ((t, data), (n, nd)):
        lib.write_kv(d["new_k"], d["new_v"], caches["k"], caches["v"], d["slots"])
        lib.copy_pages(caches["k"], caches["v"], d["src"], d["dst"])
    for caches, d in ((t8, data), (n8, nd)):
        lib.write_kv(d["new_k"], d["new_v"], caches["k"], caches["v"], d["slots"], k_scale=d["k_scale_w"],
                     v_scale=0.25)
        lib.copy_pages(caches["k"], caches["v"], d["src"], d["dst"])
    want = _expected_caches(data)
    assert _same(n["k"], t["k"]) and _same(n["v"], t["v"]) and _same(n["k"], want["w_k"])
    assert _same(n8["k"], t8["k"]) and _same(n8["v"], t8["v"]) and _same(n8["v"], want["w8_v"])


def test_bfloat16_numpy_results_are_ml_dtypes_bfloat16():
    """In-process kernels (compiled here): bfloat16 numpy in, ml_dtypes bfloat16 numpy out, as torch's bits."""
    k, v, bt, sl = make_pool([13, 1, 22], page_size=S, num_kv_heads=HKV, head_dim=D, dtype="bfloat16")
    q = random_q(3, HQ, D, "bfloat16")
    out_t, lse_t = tp.paged_decode(q, k, v, bt, sl, return_lse=True)
    out_n, lse_n = tp.paged_decode(_numpy(q), _numpy(k), _numpy(v), bt.numpy(), sl.numpy(), return_lse=True)
    assert out_n.dtype == ml_dtypes.bfloat16 and isinstance(lse_n, np.ndarray)
    assert _same(out_n, out_t) and _same(lse_n, lse_t)


def test_mixed_inputs_run_on_torch(lib, data):
    """A call with any torch tensor runs on torch: its numpy arrays are viewed as torch tensors (zero copy: the
    numpy cache is written in place) and its results are torch tensors."""
    n = _as_numpy(data)
    plain = lib.paged_decode(data["q"], data["k"], data["v"], data["bt"], data["sl"])
    numpy_q = lib.paged_decode(n["q"], data["k"], data["v"], n["bt"], n["sl"])
    numpy_caches = lib.paged_decode(data["q"], n["k"], n["v"], data["bt"], data["sl"])
    assert isinstance(numpy_q, torch.Tensor) and isinstance(numpy_caches, torch.Tensor)
    assert _same(numpy_q, plain) and _same(numpy_caches, plain)
    kc, vc = n["k"].copy(), n["v"].copy()
    lib.write_kv(data["new_k"], data["new_v"], kc, vc, n["slots"])
    live = n["slots"] >= 0
    assert np.array_equal(kc.reshape(-1, HKV, D)[n["slots"][live]], n["new_k"][live])


# ------------------------------------------------------------------------------ (c) refusals on the numpy path
def _refusals(n: dict) -> list:
    ro = n["k"].copy()
    ro.flags.writeable = False
    bad_table = n["bt"].copy()
    bad_table[4, 1] = 10_000  # sequence 4 (33 tokens) uses its second page
    return [
        (lambda lib: lib.paged_decode(n["q"].astype(np.float32), n["k"], n["v"], n["bt"], n["sl"]),
         r"^q: dtype float32 differs from the caches' float16$"),
        (lambda lib: lib.paged_decode(n["q"], n["k"], n["v"], bad_table, n["sl"]),
         r"^block_table: block_table\[4, 1\] = 10000 is outside \[0, num_pages = \d+\) and sequence 4 uses it$"),
        (lambda lib: lib.paged_decode(n["q"], n["k"], n["v"], n["bt"], n["sl"].astype(np.float32)),
         r"^seq_lens: expected int32 \[batch\], got dtype float32$"),
        (lambda lib: lib.write_kv(n["new_k"], n["new_v"], ro, n["v"], n["slots"]),
         r"^k_cache: the array is read-only, and it is written in place$"),
        (lambda lib: lib.write_kv(n["new_k"].astype(np.float32), n["new_v"], n["k"].copy(), n["v"].copy(),
                                  n["slots"]),
         r"^k: dtype float32 differs from the caches' float16$"),
        (lambda lib: lib.copy_pages(n["k"].copy(), n["v"].copy(), n["src"], n["dst"] + 1000),
         r"^dst_pages: dst_pages\[0\] = \d+ is outside \[0, num_pages = \d+\)$"),
        (lambda lib: lib.paged_decode(n["q"], n["k8"], n["v8"], n["bt"], n["sl"], k_scale=np.ones(3, np.float32)),
         r"^k_scale: expected a float or a float32 \[num_kv_heads\] = \[2\] tensor, got float32 \(3,\)$"),
    ]


@pytest.mark.parametrize("case", range(7))
def test_bad_numpy_input_refused_naming_the_argument(lib, data, case):
    call, pattern = _refusals(_as_numpy(data))[case]
    with pytest.raises(ValueError, match=pattern):
        call(lib)
