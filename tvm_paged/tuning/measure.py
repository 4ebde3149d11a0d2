"""What MetaSchedule's runner workers call for one measurement: valid paged inputs, the timing loop, the check.

Picklable pieces, run in the runner's worker processes (by reference: they import this module there):
- :class:`PagedInputs`: valid inputs (``f_alloc_argument``) instead of MetaSchedule's random fill, which would put
  random page ids in the page table. The page tables are shuffled over a pool several times the bucket's working
  set (capped by ``pool_mb``), one table per ``alloc_repeat``, all over the same K/V pool;
- :class:`RotatingTimer`: the local ``f_run_evaluator``: calls rotate through the tables, so consecutive calls do
  not find the previous call's pages in the last-level cache. (Over RPC MetaSchedule's own remote
  ``time_evaluator`` times each table in turn: honest when a bucket's K+V exceeds the remote's cache.)
  With an :class:`OutputCheck` it then compares the output with the float64 reference: a wrong variant fails.

A variant configuration's kernels take more arguments (``spec.params_for(cfg)``): dequantization scales of 1 for
8-bit caches, the standard ALiBi slopes, zero sinks; 8-bit caches are uint8 buffers of valid codes (N(0, 0.5)
values rounded to the format, never a NaN code), and the check dequantizes them and applies the same options.

The builder's pieces and the workload they measure are in :mod:`tvm_paged.tuning.workload`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import ml_dtypes  # a TVM dependency: numpy's bfloat16
import numpy as np
import torch

from .. import reference
from .. import tvm_compat as tc
from ..config import KernelConfig
from ..spec import spec_for
from .workload import ENTRY, Workload, alibi_slopes, tensor_params


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
    cfg: KernelConfig | None = None  # a shipped kernel's config (its variants' arguments); None: plain / block form

    @classmethod
    def of(cls, wl: Workload) -> PagedInputs:
        """The inputs of the shipped kernel specialized to ``wl``."""
        return cls(kernel=wl.cfg.kernel, page_size=wl.cfg.page_size, seq_lens=wl.seq_lens, q_lens=wl.q_lens,
                   tiles=wl.tiles, tables=wl.tables, seed=wl.seed, cfg=wl.cfg)

    @property
    def roles(self) -> tuple[str, ...]:
        return tensor_params(self.cfg if self.cfg is not None else self.kernel)

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
        roles = self.roles
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
        fp8 = self.cfg.kv_dtype if self.cfg is not None and self.cfg.is_fp8 else None
        for role in ("k_cache", "v_cache"):
            dtype, shape = spec[role]
            t = tc.empty(shape, dtype, device)
            _fill_random(t, shape, dtype, rng, session, fp8)
            fixed[role] = t
        # The variants' per-head inputs: scales of 1, the standard ALiBi slopes, zero sinks.
        for role in ("k_scale", "v_scale", "alibi_slopes", "sinks"):
            if role in spec:
                (heads,) = spec[role][1]
                value = {"alibi_slopes": alibi_slopes(heads), "sinks": np.zeros(heads, np.float32)}.get(
                    role, np.ones(heads, np.float32))
                fixed[role] = put(role, value)
        q_shape = spec["q"][1]
        fixed["q"] = put("q", rng.standard_normal(q_shape).astype(np.float32) * 0.5)
        fixed["seq_lens"] = put("seq_lens", np.asarray(self.seq_lens, dtype=np.int32))
        if self.kernel == "prefill":
            cu = np.concatenate([[0], np.cumsum(self.q_lens)]).astype(np.int32)
            fixed["cu_seqlens_q"] = put("cu_seqlens_q", cu)
            fixed["tiles"] = put("tiles", np.asarray(self.tiles, dtype=np.int32).reshape(-1, 3))
        for p in spec_for(self.kernel).with_role("output", "scratch", cfg=self.cfg):
            fixed[p.name] = tc.empty(spec[p.name][1], spec[p.name][0], device)
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
        return array.astype(ml_dtypes.bfloat16)
    return array.astype(dtype)


# NaN codes of the 8-bit formats and the finite code each is replaced with: e4m3fn's S.1111.111 (0x7F, 0xFF) ->
# 448; e5m2's exponent all ones (inf and NaN, 0x7C-0x7F, 0xFC-0xFF) -> the largest finite exponent.
def fp8_valid_codes(codes: np.ndarray, kv_dtype: str) -> np.ndarray:
    """``codes`` (uint8) with every NaN (and inf) code of ``kv_dtype`` replaced by a finite one."""
    codes = codes.astype(np.uint8, copy=True)
    if kv_dtype == "float8_e4m3fn":
        codes[(codes & 0x7F) == 0x7F] -= 1
    else:  # float8_e5m2
        codes[(codes & 0x7C) == 0x7C] &= 0xFB
    return codes


def _fp8_block(block: np.ndarray, kv_dtype: str) -> np.ndarray:
    """float32 values -> the codes of ``kv_dtype`` nearest them (uint8), no NaN code."""
    codes = torch.from_numpy(block).to(getattr(torch, kv_dtype)).view(torch.uint8).numpy()
    return fp8_valid_codes(codes, kv_dtype)


def _fill_random(tensor, shape, dtype: str, rng, session, fp8: str | None = None) -> None:
    """Fill a (large) cache pool with finite random values, every page written (an untouched page would be the
    OS's shared zero page). Locally: an N(0, 0.5) block tiled over it; over RPC: the remote's own random fill
    (TVM's, as MetaSchedule uses), so the pool is not sent over the network, else a tiled block sent. ``fp8``: the
    pool is an 8-bit cache of that dtype (uint8): the block's values as valid codes, sent also over RPC (random
    bytes would hold NaN codes)."""
    total = int(np.prod(shape))
    if session is not None and fp8 is None:
        try:
            session.get_function("tvm.contrib.random.random_fill_for_measure")(tensor)
            return
        except Exception:  # noqa: BLE001  (a runtime built without random: send the data)
            pass
    block = (rng.standard_normal(min(total, 1 << 20)).astype(np.float32) * 0.5)
    if fp8 is not None:
        block = _fp8_block(block, fp8)
    if session is None:
        view = torch.from_dlpack(tensor).view(-1)
        src = torch.from_numpy(block).to(view.dtype).to(view.device)
        n = src.numel()
        whole = total // n
        if whole:
            view[: whole * n].view(whole, n).copy_(src.expand(whole, n))
        if total - whole * n:
            view[whole * n:].copy_(src[: total - whole * n])
        return
    data = np.resize(block, total).reshape(shape)
    tensor.copyfrom(data if fp8 is not None else _as_dtype(data, dtype))


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
    such a trial fail instead of becoming the bucket's best. ``kernel``: a name :func:`tensor_params` knows;
    ``cfg``: a shipped kernel's configuration, whose variants' arguments (scales, slopes, sinks: read from the
    arguments; ``options``: the bound scalars, e.g. ``window_left``, ``logits_soft_cap``) the reference applies
    too, 8-bit caches dequantized.
    """

    kernel: str
    scale: float
    causal: bool = True
    cfg: KernelConfig | None = None
    options: tuple[tuple[str, float], ...] = ()

    @classmethod
    def of(cls, wl: Workload) -> "OutputCheck":
        """The check of the shipped kernel measured on ``wl`` (its variants' options included)."""
        return cls(wl.cfg.kernel, wl.scale, cfg=wl.cfg, options=tuple(sorted(wl.options.items())))

    def __call__(self, args) -> None:
        roles = tensor_params(self.cfg if self.cfg is not None else self.kernel)
        # On the host (no-op on CPU; a local GPU runner's arrays are copied: the reference runs on the CPU).
        t = {role: torch.from_dlpack(a).cpu() for role, a in zip(roles, args)}
        if self.cfg is not None and self.cfg.is_fp8:  # the caches' bytes as the torch float8 tensors they hold
            fp8 = getattr(torch, self.cfg.kv_dtype)
            t["k_cache"], t["v_cache"] = t["k_cache"].view(fp8), t["v_cache"].view(fp8)
        opts = dict(self.options)
        opts.update({name: t[name] for name in ("k_scale", "v_scale", "alibi_slopes", "sinks") if name in t})
        if self.kernel in ("prefill", "prefill_blocks"):  # the first and last sequences (a whole bucket's float64
            # prefill takes seconds); the block form has the same number of rows for every sequence.
            batch = t["seq_lens"].shape[0]
            cu = (t["cu_seqlens_q"].tolist() if "cu_seqlens_q" in t
                  else [b * (t["q"].shape[0] // batch) for b in range(batch + 1)])
            picks = sorted({0, len(cu) - 2})
            ref = torch.cat([reference.prefill(
                t["q"][cu[b]:cu[b + 1]], t["k_cache"], t["v_cache"], t["block_table"][b:b + 1],
                t["seq_lens"][b:b + 1], torch.tensor([0, cu[b + 1] - cu[b]]), scale=self.scale, causal=self.causal,
                **opts,
            )[0] for b in picks])
            out = torch.cat([t["out"][cu[b]:cu[b + 1]] for b in picks]).double()
        else:
            ref, _ = reference.decode(t["q"], t["k_cache"], t["v_cache"], t["block_table"], t["seq_lens"],
                                      scale=self.scale, **opts)
            out = t["out"].double()
        dtype = str(t["out"].dtype).replace("torch.", "")
        err = (out - ref).abs().max().item()  # a NaN fails the test below too
        if not (err <= CHECK_ATOL[dtype]):
            raise WrongOutput(f"wrong output: max abs error {err:.3g} against the float64 reference "
                              f"(tolerance {CHECK_ATOL[dtype]:.1g})")


def read_rate(buf: torch.Tensor, reads: int = 1) -> float:
    """The best of ``reads`` passes of ``torch.sum`` over ``buf`` (every core of a CPU, or a GPU, synchronized
    around each pass), in GB/s of ``buf``'s bytes: the memory read roof the benchmarks and the tuner report."""
    cuda = buf.device.type == "cuda"
    best = 0.0
    for _ in range(reads):
        if cuda:
            torch.cuda.synchronize(buf.device)
        t0 = time.perf_counter()
        buf.sum()
        if cuda:
            torch.cuda.synchronize(buf.device)
        best = max(best, buf.numel() * buf.element_size() / max(time.perf_counter() - t0, 1e-9) / 1e9)
    return best


class ReadRoof:
    """The host's memory read rate at this moment (:func:`read_rate` over an array of ``nbytes``, best of
    ``reads``). The tuner times it before each trial and records it with the trial, so a log shows what the
    machine's memory was doing while each point was timed."""

    def __init__(self, nbytes: int, reads: int = 2, settle_s: float = 0.2):
        self.buf = torch.ones(max(1, nbytes // 4), dtype=torch.float32)
        self.reads = reads
        self.settle_s = settle_s

    def __call__(self) -> float:
        best = read_rate(self.buf, self.reads)
        # torch's OpenMP workers spin for a while after a parallel region: let them sleep before the runner
        # times a kernel on the same cores.
        time.sleep(self.settle_s)
        return best


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
