"""What one measurement runs: workload buckets, the kernel specialized to one, and the builder's worker pieces.

A bucket is ``batch x max_pages_per_seq`` (``8x64``). Every sequence of a bucket fills its pages (the last one
partly: lengths ``max_pages * page_size - r``, ``0 <= r < page_size``, one sequence at the maximum), so the bucket
measures the most work its shape can hold, and GB/s is computed from the K+V bytes those lengths really read.

The kernel measured is the one that ships, with symbolic dims; its scalars (``scale``, ``causal``, ``split_pages``
and the variants' ``window_left``, ``logits_soft_cap``) are bound, because MetaSchedule's runner only passes
tensors, and the runner's argument shapes come from a copy specialized to the bucket's values (batch, pool size,
max pages, splits / query rows, tiles). A variant configuration is measured with the values a model would use: a
window of half the bucket's context (``window_left = max_pages * page_size // 2``), a soft-cap of 30, the
standard ALiBi slopes, zero sinks, dequantization scales of 1 for 8-bit caches; with a window, its GB/s counts
only the K+V bytes the window makes the kernel read.

Picklable pieces run in MetaSchedule's builder worker processes (by reference: they import this module there):
- :func:`build_module`: ``tvm.compile`` of one variant (MetaSchedule's default build first imports
  ``tvm.s_tir.tensor_intrin``, about 20 s per worker on this machine, for intrinsics these kernels never use);
- :func:`build_cuda_library` / :func:`pass_path`: the same for CUDA on a machine with no CUDA driver.

What the runner's workers call (valid paged inputs, the timing loop, the output check) is in
:mod:`tvm_paged.tuning.measure`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import hostinfo
from .. import tvm_compat as tc
from ..plan import choose_num_splits, first_visible_key
from ..toolchain import run_python_with_cuda_stub
from ..config import KernelConfig
from ..spec import SPECS, prefill_tiles, spec_for


def tensor_params(kernel) -> tuple[str, ...]:
    """Parameter order of a specialized kernel (scalars bound), from its spec: the names each argument is filled
    by. ``kernel``: a KernelConfig of a shipped family (its variants' tensors included: ``spec.params_for``), or a
    family or block-form name (``decode``, ``prefill``: the plain kernel's; ``decode_generic``,
    ``prefill_blocks``)."""
    if isinstance(kernel, KernelConfig):
        return tuple(p.name for p in SPECS[kernel.kernel].params_for(kernel) if p.is_tensor)
    return tuple(p.name for p in spec_for(kernel).params if p.is_tensor and not p.when)


# The scalar values a variant configuration is measured with (window_left: half the bucket's context, see
# make_workload).
SOFT_CAP = 30.0


def alibi_slopes(num_heads: int) -> np.ndarray:
    """The standard ALiBi slopes (Press et al.; as in Hugging Face's BLOOM / MPT): ``2^(-8 i / n)`` for ``i = 1..n``
    when ``n`` is a power of two, else those of the next lower power of two followed by every other slope of the
    next higher one. float32 ``[num_heads]``."""
    def powers(n):
        start = 2.0 ** (-(2.0 ** -(np.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** int(np.floor(np.log2(num_heads)))
    slopes = powers(closest)
    if closest < num_heads:
        slopes += powers(2 * closest)[0::2][: num_heads - closest]
    return np.asarray(slopes, dtype=np.float32)


ENTRY = "main"


@dataclass(frozen=True, order=True)
class Bucket:
    """A workload shape: ``batch`` sequences of up to ``pages`` pages each."""

    batch: int
    pages: int

    @property
    def name(self) -> str:
        return f"{self.batch}x{self.pages}"

    @classmethod
    def parse(cls, text: str) -> "Bucket":
        try:
            b, _, p = text.strip().lower().partition("x")
            bucket = cls(int(b), int(p))
        except ValueError:
            raise ValueError(f"bucket: expected BATCHxPAGES (e.g. 8x64), got {text!r}") from None
        if bucket.batch <= 0 or bucket.pages <= 0:
            raise ValueError(f"bucket: batch and pages must be positive, got {text!r}")
        if bucket.batch * bucket.pages > MAX_TABLE_ENTRIES:  # its tables and pool would be measured in TB
            raise ValueError(f"bucket: {text!r} has {bucket.batch * bucket.pages} page-table entries, at most "
                             f"{MAX_TABLE_ENTRIES}")
        return bucket


# A bucket's batch x pages: 256 sequences of 64K pages is far past any serving step.
MAX_TABLE_ENTRIES = 2**24


def parse_buckets(text: str) -> list[Bucket]:
    """``"8x64,1x1024"`` -> buckets, duplicates dropped, order kept."""
    out: list[Bucket] = []
    for part in text.split(","):
        if part.strip():
            b = Bucket.parse(part)
            if b not in out:
                out.append(b)
    if not out:
        raise ValueError("buckets: none given")
    return out


@dataclass(frozen=True)
class Workload:
    """One bucket of one config, with everything needed to specialize the kernel and build its inputs."""

    cfg: KernelConfig
    bucket: Bucket
    seq_lens: tuple[int, ...]
    num_pages: int  # pool size
    num_splits: int = 1  # decode
    q_lens: tuple[int, ...] = ()  # prefill: query rows per sequence (the last q_len tokens)
    tiles: tuple[tuple[int, int, int], ...] = ()  # prefill: (sequence, row start, row end)
    tables: int = 2
    seed: int = 0
    scale: float = field(default=0.0)
    window_left: int = -1  # the window measured (configs with the window variant), -1 none
    logits_soft_cap: float = 0.0  # the cap measured (configs with the soft_cap variant)

    @property
    def dims(self) -> dict[str, int]:
        b, m = self.bucket.batch, self.bucket.pages
        if self.cfg.kernel == "decode":
            return {"B": b, "M": m, "P": self.num_pages, "NS": self.num_splits}
        return {"B": b, "M": m, "P": self.num_pages, "TQ": sum(self.q_lens), "NT": len(self.tiles)}

    @property
    def scalars(self) -> dict:
        """The kernel's scalar arguments, bound at build time (the variants' included)."""
        base = ({"scale": self.scale, "split_pages": 0} if self.cfg.kernel == "decode"
                else {"scale": self.scale, "causal": 1})
        return {**base, **self.options}

    @property
    def options(self) -> dict:
        """The scalar attention options of a call with these arguments (``tvm_paged.reference``'s keywords)."""
        out = {}
        if self.cfg.window:
            out["window_left"] = self.window_left
        if self.cfg.soft_cap:
            out["logits_soft_cap"] = self.logits_soft_cap
        return out

    @property
    def visible_keys(self) -> tuple[int, ...]:
        """Per sequence, the cached tokens some query of the call sees (all of them without a window)."""
        q_lens = self.q_lens if self.cfg.kernel == "prefill" else 1
        first = first_visible_key(self.seq_lens, q_lens, self.window_left if self.cfg.window else -1)
        return tuple(int(n - f) for n, f in zip(self.seq_lens, first))

    @property
    def kv_bytes(self) -> int:
        """Bytes of K and V one call reads: each visible cached token once, at the caches' element size (1 for an
        8-bit cache)."""
        cfg = self.cfg
        return 2 * sum(self.visible_keys) * cfg.num_kv_heads * cfg.head_dim * cfg.kv_itemsize

    @property
    def pool_bytes(self) -> int:
        """Bytes of the K and V pools the calls rotate over."""
        cfg = self.cfg
        return 2 * self.num_pages * cfg.page_size * cfg.num_kv_heads * cfg.head_dim * cfg.kv_itemsize

    def gbps(self, seconds: float) -> float:
        return self.kv_bytes / seconds / 1e9

    def gflops(self, seconds: float) -> float:
        """GFLOP/s of a call that took ``seconds`` (see :attr:`flops`)."""
        return self.flops / seconds / 1e9

    @property
    def flops(self) -> int:
        """Floating-point operations of one call: 4 per (query row, query head, visible key, head_dim element),
        2 for q.k and 2 for P.V. Prefill is arithmetic-bound, so this rate, not GB/s, is what it is judged by."""
        cfg = self.cfg
        if cfg.kernel == "decode":
            pairs = sum(self.visible_keys)
        elif not cfg.window:  # causal: row i of the last q_len tokens sees seq_len - q_len + i + 1 keys
            pairs = sum(n * (s - n) + n * (n + 1) // 2 for s, n in zip(self.seq_lens, self.q_lens))
        else:  # and at most window_left + 1 of them
            pairs = sum(int(np.minimum(np.arange(s - n, s) + 1, self.window_left + 1).sum())
                        for s, n in zip(self.seq_lens, self.q_lens))
        return 4 * pairs * cfg.num_qo_heads * cfg.head_dim

    def module(self, func):
        """The IRModule MetaSchedule builds and measures, as ``main``: ``func`` with its scalars bound and its
        shapes left symbolic, i.e. the kernel that ships (a shape-specialized build is a different program: LLVM
        folds the constant trip counts, and knob rankings measured on it did not carry over to the shipped one)."""
        func = tc.specialize(func, None, self.scalars)
        return tc.ir_module({ENTRY: func.with_attr("global_symbol", ENTRY)})

    def shaped(self, func):
        """``func`` specialized to this bucket's shapes, as ``main``: what the runner's argument list (its shapes)
        and the database's workload entry are read from."""
        func = tc.specialize(func, self.dims, self.scalars)
        return tc.ir_module({ENTRY: func.with_attr("global_symbol", ENTRY)})

    def record_module(self, mod, kernel_hash: str):
        """The workload line of the database: ``mod``'s signature with an empty body, tagged with the config, the
        bucket and the kernel's text hash (the full kernel serializes to ~300 KB; the builder recreates it)."""
        attrs = {"tvm_paged.config": self.cfg.name, "tvm_paged.bucket": self.bucket.name,
                 "tvm_paged.kernel_hash": kernel_hash}
        return tc.ir_module({ENTRY: mod[ENTRY].with_body(tc.tirx.Evaluate(0)).with_attrs(attrs)})


# Page tables a DRAM-honest workload rotates through at most (each is one argument list in the runner).
MAX_TABLES = 256


def make_workload(cfg: KernelConfig, bucket: Bucket, *, device_kind: str = "cpu", pool_mb: float | None = None,
                  pool_factor: int = 4, tables: int = 2, seed: int = 0, q_len: int = 0) -> Workload:
    """The workload of ``bucket``: lengths, split count (as ``ops`` would pick), pool size and table count.

    ``pool_mb=None`` (local CPUs): DRAM-honest. The pool spans :func:`tvm_paged.hostinfo.dram_pool_bytes` (4x the
    last-level cache the OS reports, at least 512 MB, within a quarter of the memory available) and the runner
    rotates through enough disjoint tables (up to ``MAX_TABLES``) that the calls of one rotation touch all of it,
    so a small bucket is not timed from the cache. A number: the pool holds ``max(pool_factor, tables)`` times the
    bucket's pages, capped at ``pool_mb`` MiB of K+V (for a remote device, whose cache this machine cannot see).
    Never fewer than the bucket's own pages. ``q_len`` (prefill): query rows per sequence, 0 = whole sequence.
    """
    if cfg.kernel not in ("decode", "prefill"):
        raise ValueError(f"tuning: no workload for kernel {cfg.kernel!r} (decode or prefill)")
    S = cfg.page_size
    rng = np.random.default_rng([seed, bucket.batch, bucket.pages])
    lens = bucket.pages * S - rng.integers(0, S, size=bucket.batch)
    lens[0] = bucket.pages * S
    lens = np.maximum(lens, 1).astype(np.int64)
    working = bucket.batch * bucket.pages
    page_bytes = 2 * S * cfg.num_kv_heads * cfg.head_dim * cfg.kv_itemsize
    if pool_mb is None:
        honest = hostinfo.dram_pool_bytes() if device_kind == "cpu" else 512 << 20
        tables = max(tables, min(MAX_TABLES, -(-(honest // page_bytes) // working)))
        num_pages = working * max(pool_factor, tables)
    else:
        cap = max(working, int(pool_mb * 2**20 // page_bytes))
        num_pages = max(working, min(working * max(pool_factor, tables), cap))
    window_left = bucket.pages * S // 2 if cfg.window else -1
    common = dict(cfg=cfg, bucket=bucket, seq_lens=tuple(int(x) for x in lens), num_pages=int(num_pages),
                  tables=tables, seed=seed, scale=float(cfg.head_dim ** -0.5), window_left=window_left,
                  logits_soft_cap=SOFT_CAP if cfg.soft_cap else 0.0)
    if cfg.kernel == "decode":  # split as plan_decode does: over each sequence's visible pages
        first_page = first_visible_key(lens, 1, window_left) // S
        visible_pages = (lens + S - 1) // S - first_page
        splits = choose_num_splits(visible_pages * S, S, torch.device(device_kind))
        return Workload(num_splits=int(splits), **common)
    q_lens = tuple(int(min(n, q_len)) if q_len > 0 else int(n) for n in lens)
    tiles = tuple(prefill_tiles(q_lens))
    return Workload(q_lens=q_lens, tiles=tiles, **common)


# ------------------------------------------------------------------------ builder worker pieces
def build_module(mod, target, _params=None):
    """MetaSchedule ``f_build``: compile one variant (no tensor-intrinsic import, see the module docstring)."""
    with target:
        return tc.compile_module(mod, target).mod


_CUDA_CHILD = (
    "import json\n"
    "from tvm_paged import tvm_compat as tc\n"
    "from tvm_paged.toolchain import build_library\n"
    "mod = tc.load_json(open(sys.argv[1]).read())\n"
    "build_library({'main': mod['main']}, tc.Target(json.loads(sys.argv[2])), sys.argv[3])\n"
)


def build_cuda_library(mod, target, _params=None) -> str:
    """MetaSchedule ``f_build`` for CUDA when this machine's TVM cannot embed device code (no ``libcuda.so.1``, so
    its CUDA plugin is not loaded and a build would hold CUDA source): the variant is compiled in a child process
    that loads a libcuda stub first (``tvm_paged.toolchain``), device code by nvcc for the target's SM, host code for
    a generic CPU of the target's host architecture. Returns the library's path (see :func:`pass_path`)."""
    folder = Path(tempfile.mkdtemp(prefix="tvm_paged_tune_"))
    src = folder / "variant.json"
    src.write_text(tc.save_json(mod))
    out = folder / "variant.so"
    proc = run_python_with_cuda_stub(_CUDA_CHILD, [src, str(target), out], timeout=600)
    if proc.returncode or not out.exists():
        raise RuntimeError(f"CUDA build failed: {proc.stderr.strip()[-2000:]}")
    return str(out)


def pass_path(artifact: str) -> str:
    """MetaSchedule ``f_export`` paired with :func:`build_cuda_library`: the library is already written."""
    return artifact
