"""The CUDA kernels without a GPU.

1. Codegen: each kernel of a representative grid of configs builds through ``build.compile_kernel`` for
   ``nvidia/nvidia-h100`` (sm_90a) and ``nvidia/jetson-orin-nano`` (sm_87) into a CUDA device module whose source
   defines the expected ``__global__`` kernels (a kernel with no thread bindings would silently become host code).
2. nvcc: a subset of those sources compiles to a cubin for the target's architecture (skipped without nvcc).
3. Limits: impossible launch configurations raise ValueError before any compile; every supported config has a
   feasible default plan.
4. Numerics: the generated CUDA source of a few configs runs on the CPU in a small emulator (each CUDA thread a
   ucontext fiber; ``__syncthreads`` a block barrier; ``__shfl_sync`` a warp exchange; one block at a time, shared
   memory shared by the block's fibers) and is compared with the float64 reference. Launch grids and kernel
   arguments are replayed from TVM's lowered host code. Divergent barriers, shuffles over missing lanes and
   invalid launches fail the test. What it cannot see: the GPU memory model, timing, real fast-math rounding.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from tvm_paged import build, reference
from tvm_paged.config import KernelConfig
from tvm_paged.kernels import build_kernel, knob_space
from tvm_paged.kernels.decode_cuda import decode_plan
from tvm_paged.kernels.page_ops_cuda import page_ops_plan
from tvm_paged.kernels.prefill_cuda import knob_space as prefill_knob_space
from tvm_paged.kernels.prefill_cuda import prefill_plan
from tvm_paged.tvm_compat import Target, compile_cuda_with_nvcc, lower_for_inspection

from paged_data import ATOL, LSE_ATOL, make_pool

TARGETS = {"nvidia/nvidia-h100": "sm_90a", "nvidia/jetson-orin-nano": "sm_87"}
TDT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _att(kernel, dtype, hq, hkv, d, p):
    return KernelConfig(kernel, dtype, hq, hkv, d, p)


def _pages(kernel, dtype, hkv, d, p):
    return KernelConfig.for_pages(kernel, dtype, hkv, d, p)


# (config, targets whose source also goes through nvcc). Dtypes f32/f16/bf16, head_dim 64/80/128/256,
# page 1/5/16, group 1/4/6/8 and MQA, each kernel at least once per target through nvcc.
H100, ORIN = "nvidia/nvidia-h100", "nvidia/jetson-orin-nano"
GRID = [
    (_att("decode", "float16", 32, 8, 128, 16), (H100, ORIN)),
    (_att("decode", "bfloat16", 24, 4, 80, 5), (H100,)),
    (_att("decode", "float32", 8, 8, 256, 1), (ORIN,)),
    (_att("decode", "float16", 64, 8, 64, 16), ()),
    (_att("decode", "bfloat16", 32, 1, 128, 16), ()),
    (_att("prefill", "float16", 32, 8, 128, 16), (H100, ORIN)),
    (_att("prefill", "bfloat16", 24, 4, 80, 5), (ORIN,)),
    (_att("prefill", "float32", 8, 8, 256, 1), (H100,)),
    (_att("prefill", "float16", 32, 1, 64, 16), ()),
    (_pages("write_kv", "float16", 8, 128, 16), (H100, ORIN)),
    (_pages("write_kv", "bfloat16", 2, 80, 5), ()),
    (_pages("write_kv", "float32", 1, 256, 1), ()),
    (_pages("copy_pages", "float32", 4, 64, 1), (H100, ORIN)),
    (_pages("copy_pages", "bfloat16", 2, 80, 5), ()),
]
KERNELS_PER_FUNC = {"decode": 2, "prefill": 1, "write_kv": 1, "copy_pages": 1}


@functools.lru_cache(maxsize=None)
def _compiled(name: str, tag: str):
    """(runtime module, CUDA source) of one config on one target, compiled once per test session."""
    ex = build.compile_kernel(KernelConfig.from_name(name), Target(tag))
    return ex.mod


def _cuda_source(mod) -> str:
    cuda = [m for m in mod.imports if m.kind == "cuda"]
    assert cuda, f"no CUDA device module among the imports ({[m.kind for m in mod.imports]}): host code only?"
    return cuda[0].inspect_source("cuda")


CODEGEN_CASES = [pytest.param(cfg.name, tag, id=f"{cfg.name}-{TARGETS[tag]}") for cfg, _ in GRID for tag in TARGETS]
NVCC_CASES = [pytest.param(cfg.name, tag, id=f"{cfg.name}-{TARGETS[tag]}") for cfg, tags in GRID for tag in tags]


@pytest.mark.parametrize("name,tag", CODEGEN_CASES)
def test_codegen_is_cuda(name, tag):
    mod = _compiled(name, tag)
    src = _cuda_source(mod)
    kernels = re.findall(r'extern "C" __global__ void __launch_bounds__\((\d+)\) (\w+)\(', src)
    # Declarations and definitions: each kernel appears twice.
    names = sorted({k for _, k in kernels})
    launches = KERNELS_PER_FUNC[KernelConfig.from_name(name).kernel]
    expected = [f"{name}_kernel"] + [f"{name}_kernel_{i}" for i in range(1, launches)]
    assert names == sorted(expected), names
    for bound, kname in kernels:
        assert 0 < int(bound) <= 1024, f"{kname}: block of {bound} threads"
        if kname == f"{name}_kernel":  # the kernel with warp shuffles runs whole warps
            assert int(bound) % 32 == 0, f"{kname}: block of {bound} threads"
    # The host entry exists under the config's name.
    assert mod.implements_function(name)


@pytest.mark.parametrize("name,tag", NVCC_CASES)
def test_nvcc_cubin(name, tag):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH")
    src = _cuda_source(_compiled(name, tag))
    arch = TARGETS[tag]
    cubin = compile_cuda_with_nvcc(src, Target(tag), arch)
    assert len(cubin) > 64 and cubin[:4] == b"\x7fELF", "not an ELF cubin"
    assert int.from_bytes(cubin[18:20], "little") == 190, "ELF machine is not CUDA"
    sm = int(arch[3:5])
    flags = int.from_bytes(cubin[48:52], "little")
    assert sm in ((flags >> 8) & 0xFF, flags & 0xFF), f"cubin SM flags {flags:#x} do not say sm_{sm}"
    assert f"{name}_kernel".encode() in cubin


# --------------------------------------------------------------------------------------------- limits
def test_limits_raise_value_error():
    h100 = Target(H100)
    dec = _att("decode", "float32", 32, 8, 256, 16)
    with pytest.raises(ValueError, match="threads per block"):
        decode_plan(dec, h100, num_threads=2048)
    with pytest.raises(ValueError, match="shared memory"):  # 16 merge slots x 4 heads x 256 x 4 B = 64 KiB
        decode_plan(dec, h100, num_threads=1024, heads_per_block=4)
    with pytest.raises(ValueError, match="divide"):
        decode_plan(dec, h100, heads_per_block=3)
    with pytest.raises(ValueError, match="power of two"):
        decode_plan(dec, h100, vec=3)
    with pytest.raises(ValueError, match="warp"):
        decode_plan(dec, h100, vec=2)  # 128 lanes for head_dim 256
    pre = _att("prefill", "float32", 32, 8, 256, 16)
    with pytest.raises(ValueError, match="shared memory"):
        prefill_plan(pre, h100, kv_tile=64)  # 2 x 64 x 256 x 4 B = 128 KiB
    with pytest.raises(ValueError, match="tokens_per_step"):
        prefill_plan(pre, h100, kv_tile=6, tokens_per_step=4)
    small = Target({"kind": "cuda", "arch": "sm_87", "max_num_threads": 64, "thread_warp_size": 32,
                    "max_shared_memory_per_block": 8192})
    with pytest.raises(ValueError):
        decode_plan(dec, small, num_threads=128)
    with pytest.raises(ValueError, match="shared memory"):
        prefill_plan(pre, small, kv_tile=8)
    with pytest.raises(ValueError):
        page_ops_plan(_pages("write_kv", "float16", 8, 128, 16), h100, num_threads=48)
    # The builders check too (the tuner calls them with knobs).
    with pytest.raises(ValueError):
        build_kernel(dec, build.with_host(h100), num_threads=2048)


@pytest.mark.parametrize("tag", list(TARGETS))
def test_default_plans_fit(tag):
    """Every supported shape has a feasible default on both targets (no compile: plans only)."""
    tgt = Target(tag)
    for dtype in TDT:
        for d in (64, 80, 96, 128, 256):
            for hq, hkv in ((8, 8), (32, 8), (24, 4), (64, 8), (32, 1), (7, 7), (12, 1)):
                for p in (1, 5, 8, 16, 32):
                    for kernel, plan in (("decode", decode_plan), ("prefill", prefill_plan)):
                        pl = plan(_att(kernel, dtype, hq, hkv, d, p), tgt)
                        assert pl["num_threads"] % 32 == 0 and pl["num_threads"] <= 1024
                        assert pl["shared_bytes"] <= 48 * 1024
                    page_ops_plan(_pages("write_kv", dtype, hkv, d, p), tgt)


@pytest.mark.parametrize("tag", list(TARGETS))
def test_knob_spaces(tag):
    """The tuner may pick any point: every combination plans, and the first point is the builder's default."""
    import itertools  # noqa: PLC0415

    tgt = Target(tag)
    for dtype, hq, hkv, d, p in (("float32", 32, 8, 256, 16), ("float16", 32, 8, 128, 16), ("bfloat16", 24, 4, 80, 5),
                                 ("float16", 32, 1, 64, 1)):
        for kernel, space_fn, plan in (("decode", knob_space, decode_plan),
                                       ("prefill", prefill_knob_space, prefill_plan)):
            cfg = _att(kernel, dtype, hq, hkv, d, p)
            space = space_fn(cfg, tgt)
            assert space and all(space.values()), space
            for combo in itertools.product(*space.values()):
                plan(cfg, tgt, **dict(zip(space, combo)))
            first = {k: v[0] for k, v in space.items()}
            assert plan(cfg, tgt, **first) == plan(cfg, tgt), (cfg.name, first)


# --------------------------------------------------------------------------------------------- emulator
_SHIM = r"""
#include <cstdint>
#include <cstring>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <type_traits>
#include <csetjmp>
#include <ucontext.h>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define uint unsigned int
#define CUDART_INF_F INFINITY
struct emu_dim3 { unsigned x, y, z; };
struct half {
  uint16_t bits;
  half() = default;
  half(float f) { _Float16 h = (_Float16)f; std::memcpy(&bits, &h, 2); }
  half(double f) : half((float)f) {}
  half(int f) : half((float)f) {}
  operator float() const { _Float16 h; std::memcpy(&h, &bits, 2); return (float)h; }
};
struct nv_bfloat16 {
  uint16_t bits;
  nv_bfloat16() = default;
  nv_bfloat16(float f) {
    uint32_t u; std::memcpy(&u, &f, 4);
    if (std::isnan(f)) { bits = 0x7fc0; return; }
    u += 0x7fffu + ((u >> 16) & 1u); bits = (uint16_t)(u >> 16);
  }
  nv_bfloat16(double f) : nv_bfloat16((float)f) {}
  nv_bfloat16(int f) : nv_bfloat16((float)f) {}
  operator float() const { uint32_t u = (uint32_t)bits << 16; float f; std::memcpy(&f, &u, 4); return f; }
};
inline half __float2half_rn(float f) { return half(f); }
inline nv_bfloat16 __float2bfloat16_rn(float f) { return nv_bfloat16(f); }
template <typename T> struct alignas(8) emu_vec4 { T x, y, z, w; };
typedef emu_vec4<half> half4;
typedef emu_vec4<nv_bfloat16> nv_bfloat164;
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
template <typename A, typename B> inline typename std::common_type<A, B>::type max(A a, B b) {
  typedef typename std::common_type<A, B>::type C; return (C)a > (C)b ? (C)a : (C)b; }
template <typename A, typename B> inline typename std::common_type<A, B>::type min(A a, B b) {
  typedef typename std::common_type<A, B>::type C; return (C)a < (C)b ? (C)a : (C)b; }
inline float max(float a, float b) { return std::fmax(a, b); }
inline float min(float a, float b) { return std::fmin(a, b); }

// Fibers start through makecontext/swapcontext, then switch with _setjmp/_longjmp (no signal-mask syscall).
struct EmuFiber { ucontext_t ctx; jmp_buf jb; int state; bool started; emu_dim3 tid; int lin; char* stack; };
// state: 0 runnable, 1 at __syncthreads, 2 at a warp exchange, 3 done
static const int EMU_STACK = 256 * 1024;
static EmuFiber g_fibers[1024];
static int g_n;
static EmuFiber* g_cur;
static ucontext_t g_boot;
static jmp_buf g_sched;
static emu_dim3 g_blockIdx, g_blockDim, g_gridDim;
static uint64_t g_slot[1024];
static char g_err[512];
static void (*g_fn)(void**);
static void** g_args;
#define threadIdx (g_cur->tid)
#define blockIdx g_blockIdx
#define blockDim g_blockDim
#define gridDim g_gridDim
static void emu_fail(const char* m) { if (!g_err[0]) snprintf(g_err, sizeof g_err, "%s (block %u)", m, g_blockIdx.x); }
static inline void emu_yield(int st) { g_cur->state = st; if (!_setjmp(g_cur->jb)) _longjmp(g_sched, 1); }
inline void __syncthreads() { emu_yield(1); }
template <typename T> inline T __shfl_sync(unsigned mask, T var, int lane, int width) {
  if (mask != 0xffffffffu) emu_fail("shuffle with a partial mask");
  if (width <= 0 || width > 32 || (width & (width - 1))) emu_fail("shuffle width");
  if (g_n % 32) emu_fail("shuffle in a block that is not whole warps");
  std::memcpy(&g_slot[g_cur->lin], &var, sizeof(T));
  emu_yield(2);
  int lane_id = g_cur->lin % 32;
  int src = g_cur->lin - lane_id + (lane_id / width) * width + (int)(((unsigned)lane) % (unsigned)width);
  T out; std::memcpy(&out, &g_slot[src], sizeof(T));
  emu_yield(2);
  return out;
}
static void emu_entry() { g_fn(g_args); g_cur->state = 3; _longjmp(g_sched, 1); }
static void emu_resume(EmuFiber* f) {
  g_cur = f;
  if (_setjmp(g_sched)) return;
  if (!f->started) { f->started = true; swapcontext(&g_boot, &f->ctx); }
  _longjmp(f->jb, 1);
}
static int emu_block() {
  for (int i = 0; i < g_n; ++i) {
    EmuFiber& f = g_fibers[i];
    if (!f.stack) f.stack = (char*)std::malloc(EMU_STACK);
    getcontext(&f.ctx); f.ctx.uc_stack.ss_sp = f.stack; f.ctx.uc_stack.ss_size = EMU_STACK; f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, emu_entry, 0);
    f.state = 0; f.started = false; f.lin = i;
    f.tid.x = i % g_blockDim.x; f.tid.y = (i / g_blockDim.x) % g_blockDim.y;
    f.tid.z = i / (g_blockDim.x * g_blockDim.y);
  }
  for (;;) {
    for (int i = 0; i < g_n; ++i)
      if (g_fibers[i].state == 0) emu_resume(&g_fibers[i]);
    g_cur = nullptr;
    if (g_err[0]) return 1;
    int done = 0, at_bar = 0;
    for (int i = 0; i < g_n; ++i) { done += g_fibers[i].state == 3; at_bar += g_fibers[i].state == 1; }
    if (done == g_n) return 0;
    bool released = false;
    for (int w = 0; w * 32 < g_n; ++w) {
      int lo = w * 32, hi = std::min(g_n, lo + 32), at_warp = 0;
      for (int i = lo; i < hi; ++i) at_warp += g_fibers[i].state == 2;
      if (at_warp && at_warp == hi - lo) { for (int i = lo; i < hi; ++i) g_fibers[i].state = 0; released = true; }
    }
    if (released) continue;
    if (at_bar == g_n) { for (int i = 0; i < g_n; ++i) g_fibers[i].state = 0; continue; }
    snprintf(g_err, sizeof g_err, "divergent barrier or shuffle in block %u: %d done, %d at __syncthreads",
             g_blockIdx.x, done, at_bar);
    return 1;
  }
}
extern "C" const char* emu_error() { return g_err; }
static int emu_launch(void (*fn)(void**), void** a, int gx, int gy, int gz, int bx, int by, int bz) {
  g_err[0] = 0;
  if (gx <= 0 || gy <= 0 || gz <= 0 || bx <= 0 || by <= 0 || bz <= 0 || bx * by * bz > 1024) {
    snprintf(g_err, sizeof g_err, "invalid launch grid (%d,%d,%d) block (%d,%d,%d)", gx, gy, gz, bx, by, bz);
    return 1;
  }
  g_fn = fn; g_args = a; g_n = bx * by * bz;
  g_blockDim = {(unsigned)bx, (unsigned)by, (unsigned)bz}; g_gridDim = {(unsigned)gx, (unsigned)gy, (unsigned)gz};
  for (int z = 0; z < gz; ++z) for (int y = 0; y < gy; ++y) for (int x = 0; x < gx; ++x) {
    g_blockIdx = {(unsigned)x, (unsigned)y, (unsigned)z};
    if (emu_block()) return 1;
  }
  return 0;
}
"""

_CTYPES = {"int64_t": ctypes.c_int64, "int": ctypes.c_int32, "float": ctypes.c_float}


class _T:
    """Just enough of TVMScript's ``T`` to evaluate the host's launch-argument expressions."""

    int64 = int32 = staticmethod(int)
    max = staticmethod(max)
    min = staticmethod(min)
    Div = truncdiv = staticmethod(lambda a, b: int(a / b))
    truncmod = staticmethod(lambda a, b: int(math.fmod(a, b)))
    Cast = staticmethod(lambda _dt, x: x)


def _split_top(text: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "(["
        depth -= ch in ")]"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return out + ([cur.strip()] if cur.strip() else [])


class _Emulated:
    """A PrimFunc lowered for a CUDA target, its kernels compiled for the CPU emulator."""

    def __init__(self, func, target, workdir):
        self.host, src = lower_for_inspection(func, target)
        self.sigs = {}
        for m in re.finditer(r'extern "C" __global__ void __launch_bounds__\(\d+\) (\w+)\(([^)]*)\)\s*\{', src):
            params = []
            for p in m.group(2).split(","):
                *typ, pname = p.replace("__restrict__", "").split()
                params.append((" ".join(typ), pname))
            self.sigs[m.group(1)] = params
        body = src[src.index('extern "C" __global__'):]
        body = re.sub(r"__shared__ alignas\((\d+)\)", r"alignas(\1) static", body)
        wrappers = []
        for kname, params in self.sigs.items():
            args = ", ".join(f"({t})a[{i}]" if t.endswith("*") else f"*({t}*)a[{i}]" for i, (t, _) in enumerate(params))
            wrappers.append(f"static void call_{kname}(void** a) {{ {kname}({args}); }}\n"
                            f'extern "C" int launch_{kname}(void** a, int gx, int gy, int gz, int bx, int by, int bz)'
                            f" {{ return emu_launch(call_{kname}, a, gx, gy, gz, bx, by, bz); }}\n")
        code = _SHIM + body + "\n" + "".join(wrappers)
        so = os.path.join(workdir, f"emu_{hashlib.sha1(code.encode()).hexdigest()[:16]}.so")
        if not os.path.exists(so):
            cpp = so[:-3] + ".cpp"
            with open(cpp, "w") as fh:
                fh.write(code)
            r = subprocess.run(["g++", "-O1", "-std=c++17", "-fno-strict-aliasing", "-U_FORTIFY_SOURCE", "-w",
                                "-shared", "-fPIC", cpp,
                                "-o", so], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr[:4000]
        self.lib = ctypes.CDLL(so)
        self.lib.emu_error.restype = ctypes.c_char_p

    def __call__(self, tensors: dict, scalars: dict):
        """Run the kernels in program order; ``tensors`` by buffer name (CPU, contiguous, written in place),
        ``scalars`` the shape variables and scalar parameters by name."""
        env, aliases, calls = dict(scalars), {}, []
        for line in self.host.splitlines():
            line = line.strip()
            m = re.match(r"(\w+): T\.let\[T\.\w+\] = (.*)$", line)
            if m:
                try:
                    env[m.group(1)] = eval(m.group(2), {"T": _T}, env)  # noqa: S307  (TVM's own printout)
                except Exception:  # struct reads of the packed-call ABI: not needed
                    pass
            m = re.match(r"(\w+) = T\.decl_buffer\(.*data=(\w+)\.data", line)
            if m:
                aliases[m.group(1)] = m.group(2)
            m = re.match(r'T\.call_ffi_kernel\("(\w+)", (.*)\)$', line)
            if m:
                args = [a for a in _split_top(m.group(2)) if not re.match(r"^\w+=", a)]
                tags = re.findall(r'"([\w.]+)"', m.group(2).split("launch_params=")[1])
                calls.append((m.group(1), args, tags))
        assert calls, "no kernel launches found in the host code"
        keep = []
        for kname, args, tags in calls:
            params = self.sigs[kname]
            dims = {t: int(eval(e, {"T": _T}, env)) for t, e in zip(tags, args[len(params):])}  # noqa: S307
            ptrs = (ctypes.c_void_p * len(params))()
            for i, ((typ, _), expr) in enumerate(zip(params, args)):
                if typ.endswith("*"):
                    buf = expr[: -len(".data")]
                    while buf not in tensors:
                        buf = aliases[buf] if buf in aliases else re.sub(r"_\d+$", "", buf)
                    ptrs[i] = tensors[buf].data_ptr()
                else:
                    c = _CTYPES[typ](eval(expr, {"T": _T}, env))  # noqa: S307
                    keep.append(c)
                    ptrs[i] = ctypes.addressof(c)
            g = [dims.get(t, 1) for t in ("blockIdx.x", "blockIdx.y", "blockIdx.z", "threadIdx.x", "threadIdx.y",
                                          "threadIdx.z")]
            rc = getattr(self.lib, f"launch_{kname}")(ptrs, *g)
            assert rc == 0, f"{kname}: {self.lib.emu_error().decode()}"


@pytest.fixture(scope="module")
def emulate(tmp_path_factory):
    if sys.platform != "linux" or shutil.which("g++") is None:
        pytest.skip("the CUDA emulator needs Linux (ucontext) and g++")
    workdir = str(tmp_path_factory.mktemp("cuda_emu"))
    target = build.with_host(Target(H100))

    def run(cfg, tensors, scalars, **knobs):
        _Emulated(build_kernel(cfg, target, **knobs), target, workdir)(tensors, scalars)

    return run


def _decode_case(emulate, cfg, seq_lens, num_splits, *, scale=None, q=None, pool=None, **knobs):
    if pool is None:
        pool = make_pool(seq_lens, page_size=cfg.page_size, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                         dtype=cfg.dtype)
    kc, vc, bt, sl = pool
    b, hq, d = len(seq_lens), cfg.num_qo_heads, cfg.head_dim
    if q is None:
        q = torch.randn(b, hq, d, generator=torch.Generator().manual_seed(5)).to(TDT[cfg.dtype])
    scale = d ** -0.5 if scale is None else scale
    out = torch.full_like(q, 777.0)
    lse = torch.full((b, hq), 777.0)
    o_part = torch.full((b, num_splits, hq, d), 777.0)
    lse_part = torch.full((b, num_splits, hq), 777.0)
    emulate(cfg, {"Q": q, "K": kc, "V": vc, "BT": bt, "SL": sl, "O": out, "LSE": lse, "OP": o_part, "LP": lse_part},
            {"B": b, "P": kc.shape[0], "M": bt.shape[1], "NS": num_splits, "scale": scale}, **knobs)
    ref_out, ref_lse = reference.decode(q, kc, vc, bt.numpy(), sl.numpy(), scale=scale)
    return out, lse, ref_out, ref_lse


DECODE_EMU = [
    # dtype, hq, hkv, head_dim, page, seq_lens, splits, knobs
    ("float32", 8, 2, 64, 16, [37, 5, 32], 3, {}),
    ("float16", 24, 4, 80, 5, [1, 23, 40], 4, {}),  # group 6, head_dim 80 (10 of 16 lanes active)
    ("bfloat16", 12, 2, 96, 1, [7, 3], 8, {}),  # empty splits
    ("float16", 32, 1, 64, 16, [70, 1], 2, {}),  # MQA: 8 head groups of 4
    ("float32", 4, 4, 256, 8, [33], 1, {"num_threads": 64, "tokens_per_iter": 1}),
]


@pytest.mark.parametrize("dtype,hq,hkv,d,page,lens,splits,knobs", DECODE_EMU,
                         ids=[f"{c[0]}-h{c[1]}x{c[2]}-d{c[3]}-p{c[4]}-ns{c[6]}" for c in DECODE_EMU])
def test_emulated_decode(emulate, dtype, hq, hkv, d, page, lens, splits, knobs):
    cfg = _att("decode", dtype, hq, hkv, d, page)
    out, lse, ref_out, ref_lse = _decode_case(emulate, cfg, lens, splits, **knobs)
    assert torch.isfinite(out.float()).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out.double(), ref_out, atol=ATOL[dtype], rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=LSE_ATOL[dtype], rtol=0)


def test_emulated_decode_huge_negative_logits(emulate):
    """Logits near -5e5 (a -5e4 start of the running max would lose them all): one key dominates, so the
    output is that key's value row, and a single-key sequence returns its V exactly."""
    cfg = _att("decode", "float32", 4, 2, 64, 5)
    lens = [1, 9]
    kc, vc, bt, sl = make_pool(lens, page_size=5, num_kv_heads=2, head_dim=64, dtype="float32")
    q = torch.zeros(2, 4, 64)
    q[:, :, 0] = 1000.0
    for b, n in enumerate(lens):
        for t in range(n):
            page, slot = int(bt[b, t // 5]), t % 5
            kc[page, slot, :, 0] = -500.0 if t != n // 2 else -499.0  # logits -5e5, one at -4.99e5
    out, lse, ref_out, ref_lse = _decode_case(emulate, cfg, lens, 2, scale=1.0, q=q, pool=(kc, vc, bt, sl))
    for b, n in enumerate(lens):
        t = n // 2
        torch.testing.assert_close(out[b], vc[int(bt[b, t // 5]), t % 5].repeat_interleave(2, 0), atol=0, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=0.1, rtol=0)  # float32 logits near 5e5: ulp 0.03


PREFILL_EMU = [
    # dtype, hq, hkv, head_dim, page, seq_lens, q_lens, causal, tile rows, knobs
    ("float32", 8, 2, 64, 16, [37, 5], [20, 5], True, 16, {}),
    ("float16", 24, 4, 80, 5, [1, 23, 36], [1, 7, 20], True, 16, {}),  # chunked prefill, group 6
    ("bfloat16", 12, 2, 96, 1, [7, 30], [3, 17], False, 16, {}),
    ("float16", 8, 1, 128, 8, [50], [33], True, 40, {"kv_tile": 8, "tokens_per_step": 2}),  # tile > 16 rows
]


@pytest.mark.parametrize("dtype,hq,hkv,d,page,lens,q_lens,causal,tile,knobs", PREFILL_EMU,
                         ids=[f"{c[0]}-h{c[1]}x{c[2]}-d{c[3]}-p{c[4]}-{'causal' if c[7] else 'full'}"
                              for c in PREFILL_EMU])
def test_emulated_prefill(emulate, dtype, hq, hkv, d, page, lens, q_lens, causal, tile, knobs):
    cfg = _att("prefill", dtype, hq, hkv, d, page)
    kc, vc, bt, sl = make_pool(lens, page_size=page, num_kv_heads=hkv, head_dim=d, dtype=dtype)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(q_lens)]), dtype=torch.int32)
    total = int(cu[-1])
    q = torch.randn(total, hq, d, generator=torch.Generator().manual_seed(7)).to(TDT[dtype])
    tiles = torch.tensor([(b, r, min(r + tile, n)) for b, n in enumerate(q_lens) for r in range(0, n, tile)],
                         dtype=torch.int32).reshape(-1, 3)
    out = torch.full_like(q, 777.0)
    lse = torch.full((total, hq), 777.0)
    scale = d ** -0.5
    emulate(cfg, {"Q": q, "K": kc, "V": vc, "BT": bt, "SL": sl, "CU": cu, "TILES": tiles, "O": out, "LSE": lse},
            {"B": len(lens), "P": kc.shape[0], "M": bt.shape[1], "TQ": total, "NT": tiles.shape[0], "scale": scale,
             "causal": int(causal)}, **knobs)
    ref_out, ref_lse = reference.prefill(q, kc, vc, bt.numpy(), sl.numpy(), cu.numpy(), scale=scale, causal=causal)
    torch.testing.assert_close(out.double(), ref_out, atol=ATOL[dtype], rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=LSE_ATOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype,hkv,d,page", [("float16", 2, 80, 5), ("float32", 3, 64, 1)])
def test_emulated_page_ops(emulate, dtype, hkv, d, page):
    gen = torch.Generator().manual_seed(3)
    num_pages, n = (7, 9) if page > 1 else (20, 9)
    kc = torch.randn(num_pages, page, hkv, d, generator=gen).to(TDT[dtype])
    vc = torch.randn(num_pages, page, hkv, d, generator=gen).to(TDT[dtype])
    k = torch.randn(n, hkv, d, generator=gen).to(TDT[dtype])
    v = torch.randn(n, hkv, d, generator=gen).to(TDT[dtype])
    slots = torch.randperm(num_pages * page, generator=gen)[:n].long()
    slots[3] = -1
    want_k, want_v = kc.clone(), vc.clone()
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            want_k[s // page, s % page], want_v[s // page, s % page] = k[i], v[i]
    emulate(_pages("write_kv", dtype, hkv, d, page), {"K": k, "V": v, "KC": kc, "VC": vc, "SLOT": slots},
            {"N": n, "P": num_pages})
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    src, dst = torch.tensor([0, 5, 2], dtype=torch.int32), torch.tensor([6, 1, 3], dtype=torch.int32)
    want_k[dst.long()], want_v[dst.long()] = kc[src.long()], vc[src.long()]
    emulate(_pages("copy_pages", dtype, hkv, d, page), {"KC": kc, "VC": vc, "SRC": src, "DST": dst},
            {"C": 3, "P": num_pages})
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
