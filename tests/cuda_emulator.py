"""A CPU emulator for TVM-generated CUDA kernels, for the tests (no GPU here).

Each CUDA thread is a ucontext fiber; ``__syncthreads`` is a block barrier; ``__shfl_sync`` and
``__shfl_down_sync`` are warp exchanges (``__activemask`` is the full warp: fibers run converged between
barriers); blocks run one at a time, with shared memory shared by the block's fibers. Launch grids, kernel
arguments and the host's scratch allocations are replayed from TVM's lowered host code. Divergent barriers,
shuffles over missing lanes and invalid launches fail. What it cannot see: the GPU memory model, timing, real
fast-math rounding.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import re
import subprocess

import torch

from tvm_paged.tvm_compat import lower_for_inspection

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
typedef unsigned char uchar;
typedef unsigned short ushort;
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
inline float __fdiv_rn(float a, float b) { return a / b; }  // IEEE division (the emulator has no fast math)
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
// A warp exchange: every lane publishes ``var``, then reads lane ``src``'s (its own when ``src`` < 0).
template <typename T> inline T emu_exchange(unsigned mask, T var, int width, int src) {
  if (mask != 0xffffffffu) emu_fail("shuffle with a partial mask");
  if (width <= 0 || width > 32 || (width & (width - 1))) emu_fail("shuffle width");
  if (g_n % 32) emu_fail("shuffle in a block that is not whole warps");
  std::memcpy(&g_slot[g_cur->lin], &var, sizeof(T));
  emu_yield(2);
  T out = var;
  if (src >= 0) std::memcpy(&out, &g_slot[src], sizeof(T));
  emu_yield(2);
  return out;
}
template <typename T> inline T __shfl_sync(unsigned mask, T var, int lane, int width) {
  int lane_id = g_cur->lin % 32;
  int src = g_cur->lin - lane_id + (lane_id / width) * width + (int)(((unsigned)lane) % (unsigned)width);
  return emu_exchange(mask, var, width, src);
}
// Fibers run converged between barriers and exchanges, so the active mask is the whole warp.
inline unsigned __activemask() { return 0xffffffffu; }
template <typename T> inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width) {
  // A source lane past the caller's segment returns the caller's own value (CUDA's rule).
  int in_seg = (g_cur->lin % 32) % width;
  return emu_exchange(mask, var, width, in_seg + (int)delta < width ? g_cur->lin + (int)delta : -1);
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


class Emulated:
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
        tensors = dict(tensors)
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
            m = re.match(r"(\w+) = (\w+)\.view\(", line)
            if m:
                aliases[m.group(1)] = m.group(2)
            # Scratch the host allocates for intermediates (global buffers between kernels): NaN-filled, so a
            # kernel that reads what no earlier kernel wrote shows it.
            m = re.match(r'(\w+) = T\.alloc_buffer\(\((\d+),\)(?:, "(\w+)")?', line)
            if m:
                dtype = getattr(torch, m.group(3) or "float32")
                tensors[m.group(1)] = torch.full((int(m.group(2)),), float("nan"), dtype=dtype)
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
                        nxt = aliases[buf] if buf in aliases else re.sub(r"_\d+$", "", buf)
                        assert nxt != buf, f"{kname}: no tensor for argument {expr}"
                        buf = nxt
                    ptrs[i] = tensors[buf].data_ptr()
                else:
                    c = _CTYPES[typ](eval(expr, {"T": _T}, env))  # noqa: S307
                    keep.append(c)
                    ptrs[i] = ctypes.addressof(c)
            g = [dims.get(t, 1) for t in ("blockIdx.x", "blockIdx.y", "blockIdx.z", "threadIdx.x", "threadIdx.y",
                                          "threadIdx.z")]
            rc = getattr(self.lib, f"launch_{kname}")(ptrs, *g)
            assert rc == 0, f"{kname}: {self.lib.emu_error().decode()}"
