"""What one measurement runs: a kernel specialized to a workload bucket, and the inputs it is measured on.

A bucket is ``batch x max_pages_per_seq`` (``8x64``). Every sequence of a bucket fills its pages (the last one
partly: lengths ``max_pages * page_size - r``, ``0 <= r < page_size``, one sequence at the maximum), so the bucket
measures the most work its shape can hold, and GB/s is computed from the K+V bytes those lengths really read.

The kernel measured is the one that ships, with symbolic dims; its scalars (``scale``, ``causal``) are bound,
because MetaSchedule's runner only passes tensors, and the runner's argument shapes come from a copy specialized
to the bucket's values (batch, pool size, max pages, splits / query rows, tiles).

Picklable pieces run in MetaSchedule's worker processes (by reference: they import this module there):
- :func:`build_module`: ``tvm.compile`` of one variant (MetaSchedule's default build first imports
  ``tvm.s_tir.tensor_intrin``, about 20 s per worker on this machine, for intrinsics these kernels never use);
- :class:`PagedInputs`: valid inputs (``f_alloc_argument``) instead of MetaSchedule's random fill, which would put
  random page ids in the page table. The page tables are shuffled over a pool several times the bucket's working
  set (capped by ``pool_mb``), one table per ``alloc_repeat``, all over the same K/V pool;
- :class:`RotatingTimer`: the local ``f_run_evaluator``: calls rotate through the tables, so consecutive calls do
  not find the previous call's pages in the last-level cache. (Over RPC MetaSchedule's own remote
  ``time_evaluator`` times each table in turn: honest when a bucket's K+V exceeds the remote's cache.)
  With an :class:`OutputCheck` it then compares the output with the float64 reference: a wrong variant fails.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from .. import tvm_compat as tc
from ..config import KernelConfig
from ..spec import prefill_tiles, spec_for



def tensor_params(kernel: str) -> tuple[str, ...]:
    """Parameter order of a specialized kernel (scalars bound), from its spec: the names each argument is filled
    by. ``kernel``: a shipped family (``decode``, ``prefill``) or a block form (``decode_generic``,
    ``prefill_blocks``)."""
    return spec_for(kernel).tensor_names
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
        return bucket


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

    @property
    def dims(self) -> dict[str, int]:
        b, m = self.bucket.batch, self.bucket.pages
        if self.cfg.kernel == "decode":
            return {"B": b, "M": m, "P": self.num_pages, "NS": self.num_splits}
        return {"B": b, "M": m, "P": self.num_pages, "TQ": sum(self.q_lens), "NT": len(self.tiles)}

    @property
    def scalars(self) -> dict:
        return {"scale": self.scale} if self.cfg.kernel == "decode" else {"scale": self.scale, "causal": 1}

    @property
    def kv_bytes(self) -> int:
        """Bytes of K and V one call reads (each cached token once)."""
        cfg = self.cfg
        return 2 * sum(self.seq_lens) * cfg.num_kv_heads * cfg.head_dim * cfg.itemsize

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
            pairs = sum(self.seq_lens)
        else:  # causal: row i of the last q_len tokens sees seq_len - q_len + i + 1 keys
            pairs = sum(n * (s - n) + n * (n + 1) // 2 for s, n in zip(self.seq_lens, self.q_lens))
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
        return tc.ir_module({ENTRY: tc.signature_only(mod[ENTRY], attrs)})

    def inputs(self) -> "PagedInputs":
        return PagedInputs(
            kernel=self.cfg.kernel, page_size=self.cfg.page_size, seq_lens=self.seq_lens, q_lens=self.q_lens,
            tiles=self.tiles, tables=self.tables, seed=self.seed,
        )


def make_workload(cfg: KernelConfig, bucket: Bucket, *, device_kind: str = "cpu", pool_mb: float = 512,
                  pool_factor: int = 4, tables: int = 2, seed: int = 0, q_len: int = 0) -> Workload:
    """The workload of ``bucket``: lengths, split count (as ``ops`` would pick), pool size.

    The pool holds ``max(pool_factor, tables)`` times the bucket's pages, capped at ``pool_mb`` MiB of K+V, and
    never fewer than the bucket's own pages. ``q_len`` (prefill): query rows per sequence, 0 = whole sequence.
    """
    from .. import ops  # noqa: PLC0415  (torch: only in the tuning process)

    import torch  # noqa: PLC0415

    if cfg.kernel not in ("decode", "prefill"):
        raise ValueError(f"tuning: no workload for kernel {cfg.kernel!r} (decode or prefill)")
    S = cfg.page_size
    rng = np.random.default_rng([seed, bucket.batch, bucket.pages])
    lens = bucket.pages * S - rng.integers(0, S, size=bucket.batch)
    lens[0] = bucket.pages * S
    lens = np.maximum(lens, 1).astype(np.int64)
    working = bucket.batch * bucket.pages
    page_bytes = 2 * S * cfg.num_kv_heads * cfg.head_dim * cfg.itemsize
    cap = max(working, int(pool_mb * 2**20 // page_bytes))
    num_pages = max(working, min(working * max(pool_factor, tables), cap))
    common = dict(cfg=cfg, bucket=bucket, seq_lens=tuple(int(x) for x in lens), num_pages=int(num_pages),
                  tables=tables, seed=seed, scale=float(cfg.head_dim ** -0.5))
    if cfg.kernel == "decode":
        splits = ops.choose_num_splits(lens, S, torch.device(device_kind))
        return Workload(num_splits=int(splits), **common)
    q_lens = tuple(int(min(n, q_len)) if q_len > 0 else int(n) for n in lens)
    tiles = tuple(prefill_tiles(q_lens))
    return Workload(q_lens=q_lens, tiles=tiles, **common)


# ------------------------------------------------------------------------------- worker-side pieces
def build_module(mod, target, _params=None):
    """MetaSchedule ``f_build``: compile one variant (no tensor-intrinsic import, see the module docstring)."""
    with target:
        return tc.compile_module(mod, target).mod


_CUDA_CHILD = (
    "import json\n"
    "from tvm_paged import tvm_compat as tc\n"
    "from tvm_paged.export import build_library\n"
    "mod = tc.load_json(open(sys.argv[1]).read())\n"
    "build_library({'main': mod['main']}, tc.Target(json.loads(sys.argv[2])), sys.argv[3])\n"
)


def build_cuda_library(mod, target, _params=None) -> str:
    """MetaSchedule ``f_build`` for CUDA when this machine's TVM cannot embed device code (no ``libcuda.so.1``, so
    its CUDA plugin is not loaded and a build would hold CUDA source): the variant is compiled in a child process
    that loads a libcuda stub first (``tvm_paged.export``), device code by nvcc for the target's SM, host code for
    a generic CPU of the target's host architecture. Returns the library's path (see :func:`pass_path`)."""
    import tempfile  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from ..export import run_python_with_cuda_stub  # noqa: PLC0415

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


_INPUT_CACHE: dict = {}  # one entry: the last inputs a local runner worker built (pools are large)


@dataclass(frozen=True)
class PagedInputs:
    """MetaSchedule ``f_alloc_argument`` that builds valid paged-attention inputs for a specialized kernel.

    Called as ``(device, args_info, alloc_repeat)`` by ``LocalRunner`` and ``(session, device, args_info,
    alloc_repeat)`` by ``RPCRunner``; returns ``alloc_repeat`` argument lists sharing one K/V pool and differing
    in their page table (each a shuffle of distinct pool pages while the pool allows). A local worker keeps the
    last inputs it built and reuses them for the next variant of the same workload.
    """

    kernel: str
    page_size: int
    seq_lens: tuple[int, ...]
    q_lens: tuple[int, ...] = ()
    tiles: tuple[tuple[int, int, int], ...] = ()
    tables: int = 2
    seed: int = 0

    def __call__(self, *args):
        if len(args) == 4:
            session, device, args_info, repeat = args
            local = False
        else:
            device, args_info, repeat = args
            session, local = None, True
        key = (self, tuple(repr(a) for a in args_info), int(repeat), str(device))
        if local and _INPUT_CACHE.get("key") == key:
            return _INPUT_CACHE["args"]
        _INPUT_CACHE.clear()
        repeated = self._alloc(device, args_info, int(repeat), session)
        if local:
            _INPUT_CACHE.update(key=key, args=repeated)
        return repeated

    def _alloc(self, device, args_info, repeat: int, session):
        roles = tensor_params(self.kernel)
        if len(args_info) != len(roles):
            raise ValueError(f"PagedInputs: {len(args_info)} arguments, a {self.kernel} kernel takes {roles}")
        spec = {role: (str(info[1]), tuple(int(s) for s in info[2])) for role, info in zip(roles, args_info)}
        rng = np.random.default_rng(self.seed)
        num_pages = spec["k_cache"][1][0]
        batch, max_pages = spec["block_table"][1]
        need = [-(-n // self.page_size) for n in self.seq_lens]
        if len(self.seq_lens) != batch or max(need) > max_pages or batch * max_pages > num_pages:
            raise ValueError(f"PagedInputs: lengths {self.seq_lens} do not fit block_table {spec['block_table'][1]} "
                             f"over {num_pages} pages of {self.page_size}")

        def put(role, array):
            dtype, shape = spec[role]
            array = np.ascontiguousarray(array.reshape(shape))
            t = tc.empty(shape, dtype, device)
            t.copyfrom(_as_dtype(array, dtype))
            return t

        fixed = {}
        for role in ("k_cache", "v_cache"):
            dtype, shape = spec[role]
            t = tc.empty(shape, dtype, device)
            _fill_random(t, shape, dtype, rng, session)
            fixed[role] = t
        q_dtype, q_shape = spec["q"]
        fixed["q"] = put("q", rng.standard_normal(q_shape).astype(np.float32) * 0.5)
        fixed["seq_lens"] = put("seq_lens", np.asarray(self.seq_lens, dtype=np.int32))
        if self.kernel == "prefill":
            cu = np.concatenate([[0], np.cumsum(self.q_lens)]).astype(np.int32)
            fixed["cu_seqlens_q"] = put("cu_seqlens_q", cu)
            fixed["tiles"] = put("tiles", np.asarray(self.tiles, dtype=np.int32).reshape(-1, 3))
        for role in ("out", "lse", "o_part", "lse_part"):
            if role in spec:
                fixed[role] = tc.empty(spec[role][1], spec[role][0], device)
        perm = rng.permutation(num_pages)
        per_table = batch * max_pages
        repeated = []
        for t in range(max(1, repeat)):
            if (t + 1) * per_table > num_pages:  # pool too small for disjoint tables: reshuffle
                perm = rng.permutation(num_pages)
                start = 0
            else:
                start = t * per_table
            table = perm[start:start + per_table].astype(np.int32)
            args = dict(fixed, block_table=put("block_table", table))
            repeated.append([args[role] for role in roles])
        return repeated


def _as_dtype(array: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        import ml_dtypes  # noqa: PLC0415  (a TVM dependency)

        return array.astype(ml_dtypes.bfloat16)
    return array.astype(dtype)


def _fill_random(tensor, shape, dtype: str, rng, session) -> None:
    """Fill a (large) cache pool with finite random values, every page written (an untouched page would be the
    OS's shared zero page). Locally: an N(0, 0.5) block tiled over it; over RPC: the remote's own random fill
    (TVM's, as MetaSchedule uses), so the pool is not sent over the network, else a tiled block sent."""
    total = int(np.prod(shape))
    if session is not None:
        try:
            session.get_function("tvm.contrib.random.random_fill_for_measure")(tensor)
            return
        except Exception:  # noqa: BLE001  (a runtime built without random: send the data)
            pass
    block = (rng.standard_normal(min(total, 1 << 20)).astype(np.float32) * 0.5)
    if session is None:
        import torch  # noqa: PLC0415

        view = torch.from_dlpack(tensor).view(-1)
        src = torch.from_numpy(block).to(view.dtype).to(view.device)
        n = src.numel()
        whole = total // n
        if whole:
            view[: whole * n].view(whole, n).copy_(src.expand(whole, n))
        if total - whole * n:
            view[whole * n:].copy_(src[: total - whole * n])
        return
    tensor.copyfrom(_as_dtype(np.resize(block, total).reshape(shape), dtype))


# Largest |out - reference| an output check accepts, by the kernel's dtype (float32 accumulation throughout; the
# runner's inputs are N(0, 0.5), so outputs are O(1)). Looser than the tests' tolerances: the check must not
# reject a correct variant for its summation order, only catch a wrong program.
CHECK_ATOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 6e-2}


class WrongOutput(RuntimeError):
    """A measured variant's output does not match the float64 reference: the trial counts as failed."""


@dataclass(frozen=True)
class OutputCheck:
    """Compares a variant's ``out`` with :mod:`tvm_paged.reference` (float64) on the inputs it was timed on.

    MetaSchedule's generic space can produce wrong programs (TVM 0.27 decomposes a reduction whose write-back was
    moved under a consumer's reduction loop outside that loop, so the sum is accumulated again on every pass:
    seen on the block-form decode kernel), and a wrong program is often the fastest. A check in the runner makes
    such a trial fail instead of becoming the bucket's best. ``kernel``: a name :func:`tensor_params` knows.
    """

    kernel: str
    scale: float
    causal: bool = True

    def __call__(self, args) -> None:
        import torch  # noqa: PLC0415  (runs in the runner's worker process)

        from .. import reference  # noqa: PLC0415

        roles = tensor_params(self.kernel)
        # On the host (no-op on CPU; a local GPU runner's arrays are copied: the reference runs on the CPU).
        t = {role: torch.from_dlpack(a).cpu() for role, a in zip(roles, args)}
        if self.kernel in ("prefill", "prefill_blocks"):  # the first and last sequences (a whole bucket's float64
            # prefill takes seconds); the block form has the same number of rows for every sequence.
            batch = t["seq_lens"].shape[0]
            cu = (t["cu_seqlens_q"].tolist() if "cu_seqlens_q" in t
                  else [b * (t["q"].shape[0] // batch) for b in range(batch + 1)])
            picks = sorted({0, len(cu) - 2})
            ref = torch.cat([reference.prefill(
                t["q"][cu[b]:cu[b + 1]], t["k_cache"], t["v_cache"], t["block_table"][b:b + 1],
                t["seq_lens"][b:b + 1], torch.tensor([0, cu[b + 1] - cu[b]]), scale=self.scale, causal=self.causal,
            )[0] for b in picks])
            out = torch.cat([t["out"][cu[b]:cu[b + 1]] for b in picks]).double()
        else:
            ref, _ = reference.decode(t["q"], t["k_cache"], t["v_cache"], t["block_table"], t["seq_lens"],
                                      scale=self.scale)
            out = t["out"].double()
        dtype = str(t["out"].dtype).replace("torch.", "")
        err = (out - ref).abs().max().item()  # a NaN fails the test below too
        if not (err <= CHECK_ATOL[dtype]):
            raise WrongOutput(f"wrong output: max abs error {err:.3g} against the float64 reference "
                              f"(tolerance {CHECK_ATOL[dtype]:.1g})")


@dataclass(frozen=True)
class RotatingTimer:
    """MetaSchedule ``f_run_evaluator`` for local runners: one warm-up call per table, then ``repeat`` timings,
    each of at least ``min_repeat_ms`` (and ``number`` calls), rotating through the tables call by call.
    Returns seconds per call, one value per repeat. With ``check``, the output of the last call is then compared
    with the reference, and a wrong one raises (MetaSchedule records the trial as failed)."""

    check: OutputCheck | None = None

    def __call__(self, rt_mod, device, config, repeated_args):
        fn = rt_mod[ENTRY]
        for args in repeated_args:
            fn(*args)
        device.sync()
        t0 = time.perf_counter()
        fn(*repeated_args[0])
        device.sync()
        one = max(time.perf_counter() - t0, 1e-7)
        n_tables = len(repeated_args)
        calls = max(int(config.number), math.ceil(config.min_repeat_ms / 1e3 / one))
        calls = -(-calls // n_tables) * n_tables
        costs = []
        for _ in range(max(1, int(config.repeat))):
            t0 = time.perf_counter()
            for i in range(calls):
                fn(*repeated_args[i % n_tables])
            device.sync()
            costs.append((time.perf_counter() - t0) / calls)
        if self.check is not None:  # calls is a multiple of the table count: the last call used the last table
            self.check(repeated_args[-1])
        return costs
