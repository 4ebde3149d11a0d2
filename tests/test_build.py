"""Configs, target resolution and the compile caches."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tvm_paged import build, targets
from tvm_paged import tvm_compat as tc
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
    key = targets.target_key(t)
    assert key.startswith(f"llvm-{host_cpu()}") and key.endswith(f"-{allowed_cores()}c")


def test_local_target_has_the_hosts_features():
    """The local target enables what the chip has, whatever LLVM's name for it implies: every feature the host
    reports present is on, every one it reports absent is off."""
    t = targets.local_target()
    host = tc.host_cpu_features()
    enabled = tc.cpu_features(t)
    assert host and {f for f, on in host.items() if on} <= enabled
    assert not {f for f, on in host.items() if not on} & enabled
    if host.get("avx512f"):
        assert "prefer-256-bit" not in enabled and targets.cpu_vector_lanes(t) == 16


def _xeon_features(host: dict) -> dict:
    """A host feature list like the Xeon's (AVX-512 with FP16 and BF16, AMX), in this LLVM's feature names."""
    on = set(tc.cpu_features(tc.Target({"kind": "llvm", "mcpu": "sapphirerapids"})))
    return {f: f in on for f in host}


def test_host_mattr_and_key_of_a_xeon_named_rocketlake():
    """LLVM names the Xeon ``rocketlake``, which lacks AVX512-FP16, AVX512-BF16 and AMX: the mattr adds them and
    turns off the 256-bit preference; the key shows the kernel-relevant changes only, sorted."""
    features = _xeon_features(tc.host_cpu_features())
    mattr = targets.host_mattr("rocketlake", features)
    assert {"+avx512fp16", "+avx512bf16", "+amx-tile", "-prefer-256-bit"} <= set(mattr)
    t = targets.resolve_target({"kind": "llvm", "mcpu": "rocketlake", "mattr": mattr, "num-cores": 2})
    assert tc.cpu_has_feature("avx512fp16", t) and tc.cpu_has_feature("amx-tile", t)
    assert "prefer-256-bit" not in tc.cpu_features(t)
    assert targets.target_key(t) == "llvm-rocketlake+amx+bf16+fp16+zmm-2c"


def test_host_mattr_of_a_vm_hiding_avx512():
    """A CPU name that implies AVX-512 on a host (a VM) that reports none: the mattr turns it off, so no kernel
    executes an instruction the machine lacks, and the key says so."""
    host = tc.host_cpu_features()
    hidden = {f: (on and not f.startswith("avx512")) for f, on in _xeon_features(host).items()}
    mattr = targets.host_mattr("sapphirerapids", hidden)
    assert "-avx512f" in mattr and not any(m.startswith("+avx512") for m in mattr)
    t = targets.resolve_target({"kind": "llvm", "mcpu": "sapphirerapids", "mattr": mattr, "num-cores": 2})
    assert targets.cpu_vector_lanes(t) == 8
    assert "+noavx512" in targets.target_key(t) and "+nofp16" in targets.target_key(t)
    plain = targets.resolve_target({"kind": "llvm", "mcpu": "znver3", "num-cores": 2})
    assert targets.target_key(plain) == "llvm-znver3-2c"


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


@pytest.mark.parametrize("tag,mcpu,key", [("arm/jetson-orin-cpu", "cortex-a78", "llvm-aarch64-cortex-a78-6c"),
                                          ("aws/graviton3", "neoverse-v1", "llvm-aarch64-neoverse-v1-64c"),
                                          ("raspberry-pi/5", "cortex-a76", "llvm-aarch64-cortex-a76-4c")])
def test_arm_cpu_tags_compile_neon_kernels(tag, mcpu, key):
    """The Arm CPU tags name their core; float16 decode compiles to NEON float32 FMAs fed by fcvtl widening
    (fullfp16 cores; the kernels accumulate in float32), and Neoverse-V1's SVE is used."""
    import re

    from tvm_paged.kernels import build_kernel

    t = targets.resolve_target(tag)
    assert str(t.attrs["mcpu"]) == mcpu and targets.target_key(t) == key
    assert tc.cpu_has_feature("neon", t) and tc.cpu_has_feature("fullfp16", t)
    cfg = KernelConfig("decode", "float16", 8, 2, 64, 16)
    asm = tc.compile_module(build_kernel(cfg, t), t).mod.inspect_source("asm")
    assert re.search(r"fmla\s+v\d+\.4s", asm) and re.search(r"fcvtl2?\s+v\d+\.4s", asm)
    assert bool(re.search(r"\bz\d+\.[shd]", asm)) == (mcpu == "neoverse-v1")


def test_tvm_cannot_feed_bfloat16_vectors_to_llvm():
    """Why no kernel uses AVX512-BF16's vdpbf16ps: TVM 0.27 legalizes every bfloat16 value to float32 before
    codegen, so the intrinsic gets ``<32 x float>`` operands and LLVM rejects the module. When a TVM release
    compiles this, the bfloat16 dot products become usable (and this test says so by failing)."""
    from tvm_paged.tvm_compat import T

    @T.prim_func
    def dot(a: T.Buffer((16,), "float32"), b: T.Buffer((32,), "uint16"), c: T.Buffer((32,), "uint16")):
        T.func_attr({"global_symbol": "dot", "tir.noalias": True})
        a[T.ramp(0, 1, 16)] = T.call_llvm_pure_intrin(
            "float32x16", "llvm.x86.avx512bf16.dpbf16ps.512", a[T.ramp(0, 1, 16)],
            T.reinterpret("bfloat16x32", b[T.ramp(0, 1, 32)]), T.reinterpret("bfloat16x32", c[T.ramp(0, 1, 32)]))

    target = targets.resolve_target({"kind": "llvm", "mcpu": "sapphirerapids"})
    with pytest.raises(Exception, match="does not match function signature"):
        tc.compile_module(dot, target)
