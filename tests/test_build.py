"""Configs, target resolution and the compile caches."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tvm_paged import build, targets
from tvm_paged.config import KernelConfig
from tvm_paged.tvm_compat import allowed_cores, host_cpu


def test_config_names_round_trip():
    cfg = KernelConfig("decode", "float16", 32, 8, 128, 16)
    assert cfg.name == "decode_f16_h32x8_d128_p16"
    assert KernelConfig.from_name(cfg.name) == cfg
    page = cfg.with_kernel("write_kv")
    assert page.name == "write_kv_f16_h8_d128_p16"
    assert KernelConfig.from_name(page.name) == page
    with pytest.raises(ValueError, match="num_qo_heads"):
        KernelConfig("decode", "float32", 6, 4, 64, 16)
    with pytest.raises(ValueError, match="dtype"):
        KernelConfig("decode", "float64", 4, 4, 64, 16)
    with pytest.raises(ValueError, match="page_size"):
        KernelConfig("decode", "float32", 4, 4, 64, 0)


def test_local_target_is_the_host():
    t = targets.local_target()
    assert t.kind.name == "llvm"
    assert t.attrs["mcpu"] == host_cpu() != ""
    assert int(t.attrs["num-cores"]) == allowed_cores()
    assert targets.resolve_target("local") == t or str(targets.resolve_target("local")) == str(t)
    assert targets.target_key(t) == f"llvm-{host_cpu()}-{allowed_cores()}c"


def test_resolve_tags_and_dicts():
    h100 = targets.resolve_target("nvidia/nvidia-h100")
    assert targets.target_kind(h100) == "cuda" and targets.target_key(h100) == "cuda-sm_90a"
    orin = targets.resolve_target("nvidia/jetson-orin-nano")
    assert targets.target_key(orin) == "cuda-sm_87"
    d = targets.resolve_target('{"kind": "llvm", "mcpu": "znver4"}')
    assert d.attrs["mcpu"] == "znver4" and int(d.attrs["num-cores"]) >= 1
    with pytest.raises(ValueError, match="target"):
        targets.resolve_target("no/such-tag")
    with pytest.raises(ValueError, match="target"):
        targets.resolve_target("{not json")


def test_thread_pool_uses_every_core():
    """With no TVM_NUM_THREADS of the user's, the runtime pool gets every core this process may use."""
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    code = "import tvm_paged.tvm_compat as tc; print(tc.runtime_num_threads())"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert int(res.stdout.split()[-1]) == allowed_cores()


def test_second_process_loads_from_disk(tmp_path):
    """A second process finds the compiled library on disk and compiles nothing."""
    script = textwrap.dedent(
        """
        import sys, torch
        import tvm_paged as tp
        from tvm_paged import tvm_compat
        if sys.argv[1] == "forbid":
            def refuse(*a, **k):
                raise RuntimeError("compiled in the second process")
            tvm_compat.compile_module = refuse
        torch.manual_seed(0)
        k = torch.randn(6, 5, 2, 64); v = torch.randn(6, 5, 2, 64); q = torch.randn(2, 4, 64)
        bt = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32); sl = torch.tensor([7, 10], dtype=torch.int32)
        out = tp.paged_decode(q, k, v, bt, sl)
        print("ok", float(out.sum()))
        """
    )
    env = dict(os.environ, TVM_PAGED_CACHE_DIR=str(tmp_path))
    first = subprocess.run([sys.executable, "-c", script, "allow"], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    assert list(tmp_path.rglob("decode_f32_h4x2_d64_p5-*.so"))
    second = subprocess.run([sys.executable, "-c", script, "forbid"], env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout.split()[1] == first.stdout.split()[1]
