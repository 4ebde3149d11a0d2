"""Load a library written by ``tvm-paged export`` and run the functional API on its kernels.

    lib = tvm_paged.load("exports/orin")          # checks SHA-256, TVM/ffi versions, architecture
    out = lib.paged_decode(q, k_cache, v_cache, block_table, seq_lens)

The returned :class:`PagedLibrary` offers ``paged_decode``, ``paged_prefill``, ``write_kv``, ``copy_pages``,
``plan_decode`` / ``run_decode``, ``plan_prefill`` / ``run_prefill`` with the signatures and the validation of
:mod:`tvm_paged.ops`, plus a check that every tensor fits the exported configuration and device.

A library holds the kernels of the cache dtypes and attention-variant combinations it was exported with (see
:mod:`tvm_paged.export`). A call runs the kernel whose configuration matches its options exactly (window from the
plan, soft-cap when ``logits_soft_cap > 0``, ALiBi / sinks when given, 8-bit from the caches' dtype); one the
library lacks is refused with a ``ValueError`` naming what was asked and what the library holds, before any
kernel runs. At load, every kernel's recorded family, variants, cache dtype and parameter list are checked
against this version's spec for its configuration; an export of an older manifest format is refused (re-export).

Loading compiles nothing: this module reaches TVM only through ``tvm_compat``'s runtime load; it imports neither
``tvm_paged.build``'s compile path, nor ``tvm_paged.kernels``, nor MetaSchedule, and needs no C or CUDA compiler.
A CUDA library holds compiled device code; the machine needs the CUDA driver and TVM's CUDA runtime only.

Nor does it need torch: a CPU library runs on numpy arrays (bfloat16 and 8-bit caches as ``ml_dtypes`` arrays)
with TVM's runtime, numpy and ml_dtypes alone, and returns numpy arrays; torch tensors in give torch tensors out
(the library follows the inputs: :mod:`tvm_paged.arrays`).

**Loading a library runs its code** (its initialisers when it is opened, its kernels when called): load only
libraries you trust. The SHA-256 check (``verify=True``, the default) refuses a library changed since its
manifest was written; it cannot catch a library and manifest replaced together.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from . import ops
from . import tvm_compat as tc
from .binary import FORMAT, MANIFEST, ElfFile, host_machine, sha256_file
from .config import ATTENTION_KERNELS, FP8_DTYPES, VARIANTS, KernelConfig
from .spec import SPECS

# What each attention variant is, in words, for the refusal of a kernel the library lacks (the tags the message
# suggests for --variants are the config's name tags: w, cap, alibi, sink).
_VARIANT_WORDS = {"window": "a sliding window (window_left >= 0)",
                  "soft_cap": "a logits soft-cap (logits_soft_cap > 0)", "alibi": "ALiBi (alibi_slopes)",
                  "sinks": "attention sinks (sinks)"}


class LoadError(ValueError):
    """A library that cannot be loaded here: missing or malformed files, another architecture, no CUDA runtime."""


class IntegrityError(LoadError):
    """The library's SHA-256 differs from its manifest's: it changed after export."""


class AbiMismatchError(LoadError):
    """The library was exported with another TVM or tvm-ffi version than this process runs."""


def load(path, *, verify: bool = True) -> "PagedLibrary":
    """Load an export folder (or its ``manifest.json``). Loading runs the library's code: see the module docstring.

    ``verify``: refuse a library whose SHA-256 differs from the manifest (default on).
    Raises :class:`LoadError` (a ValueError; :class:`IntegrityError`, :class:`AbiMismatchError`) before any
    kernel runs.
    """
    path = Path(path)
    manifest_path = path / MANIFEST if path.is_dir() else path
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LoadError(f"{manifest_path}: not a readable export manifest ({exc})") from exc
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != FORMAT:
        if isinstance(found, str) and found.startswith(FORMAT.rpartition("/")[0] + "/"):
            raise LoadError(f"{manifest_path}: export format {found!r} is from another tvm_paged version (this one "
                            f"reads {FORMAT!r}, whose manifest records each kernel's variants and signature): "
                            "re-export the library with this version's `tvm-paged export`")
        raise LoadError(f"{manifest_path}: format {found!r} is not {FORMAT!r}: not a tvm_paged export of this "
                        "version (re-export with `tvm-paged export`)")
    try:
        lib_name = manifest["library"]["file"]
        kernels = manifest["kernels"]
        config = KernelConfig("decode", *(manifest["config"][k] for k in
                                          ("dtype", "num_qo_heads", "num_kv_heads", "head_dim", "page_size")))
        kv_dtypes = list(manifest["config"]["kv_dtypes"])
        combos = [tuple(c) for c in manifest["config"]["variants"]]
        target_kind = manifest["target"]["kind"]
        if not isinstance(kernels, dict):
            raise TypeError("kernels is not an object")
        expected = _expected_configs(config, kv_dtypes, combos)
    except (KeyError, TypeError, ValueError) as exc:
        raise LoadError(f"{manifest_path}: malformed manifest ({exc!r})") from exc
    if Path(lib_name).name != lib_name:
        raise LoadError(f"{manifest_path}: library file {lib_name!r} must sit next to the manifest")
    lib_path = manifest_path.parent / lib_name
    if not lib_path.is_file():
        raise LoadError(f"{lib_path}: library file missing")

    if verify:
        digest = sha256_file(lib_path)
        if digest != manifest["library"].get("sha256"):
            raise IntegrityError(f"{lib_path}: SHA-256 {digest} does not match the manifest's "
                                 f"{manifest['library'].get('sha256')}; refusing a library changed after export")
    versions = manifest.get("versions", {})
    if not isinstance(versions, dict):
        raise LoadError(f"{manifest_path}: malformed manifest (versions is not an object)")
    here = {"tvm": tc.TVM_VERSION, "tvm_ffi": tc.FFI_VERSION}
    for key, mine in here.items():
        if versions.get(key) != mine:
            raise AbiMismatchError(f"{manifest_path}: exported with {key} {versions.get(key)}, this process runs "
                                   f"{key} {mine}; re-export with this TVM (the runtime ABI is not stable)")
    if set(kernels) != set(expected):
        raise LoadError(f"{manifest_path}: the library holds kernels {sorted(kernels)}, not {sorted(expected)} "
                        "(what its configuration, kv_dtypes and variants call for)")
    for name, info in kernels.items():
        cfg = expected[name]
        if not isinstance(info, dict):
            raise LoadError(f"{manifest_path}: kernel {name}: malformed entry")
        recorded = (info.get("symbol"), info.get("family"), info.get("variants"), info.get("kv_dtype"))
        if recorded != (cfg.name, cfg.kernel, list(cfg.variants), cfg.kv_dtype):
            raise LoadError(f"{manifest_path}: kernel {name} is recorded as symbol {recorded[0]!r}, family "
                            f"{recorded[1]!r}, variants {recorded[2]!r}, kv_dtype {recorded[3]!r}, which is not "
                            f"what {name} means to this tvm_paged: re-export with this version")
        # The whole calling convention (names, roles, dtypes, shapes) must be the one this version binds.
        if info.get("params") != SPECS[cfg.kernel].signature(cfg):
            params = tuple(p.get("name") for p in info.get("params") or () if isinstance(p, dict))
            raise LoadError(f"{manifest_path}: kernel {name} takes ({', '.join(map(str, params))}) as exported; "
                            "this tvm_paged passes a different argument list: re-export with this version")
    with open(lib_path, "rb") as f:
        try:
            machine = ElfFile(f.read()).machine
        except ValueError as exc:
            raise LoadError(f"{lib_path}: {exc}") from exc
    if machine != host_machine():
        raise LoadError(f"{lib_path}: built for {machine}, this machine is {host_machine()}")
    if target_kind == "cuda" and not tc.cuda_runtime_available():
        raise LoadError(f"{lib_path}: holds CUDA kernels, but TVM's CUDA runtime is not available in this process "
                        "(libtvm_runtime_cuda.so did not load: is the CUDA driver, libcuda.so.1, installed?)")
    try:
        module = tc.load_module(str(lib_path))
        functions = {expected[name]: module[info["symbol"]] for name, info in kernels.items()}
    except Exception as exc:  # TVM raises its own error types
        raise LoadError(f"{lib_path}: TVM could not load it ({exc})") from exc
    return PagedLibrary(manifest, lib_path, config, functions, module)


def _expected_configs(base: KernelConfig, kv_dtypes: list[str], combos: list[tuple]) -> dict[str, KernelConfig]:
    """name -> KernelConfig of every kernel an export of ``base`` with these cache dtypes and variant combinations
    holds (the export's :func:`tvm_paged.export.kernel_configs`, restated here: the loader does not import the
    export's compile path)."""
    if not kv_dtypes or kv_dtypes[0] != base.dtype:
        raise ValueError(f"kv_dtypes {kv_dtypes} must start with the base dtype {base.dtype}")
    fields = {tag: field for field, tag in VARIANTS}
    out = {}
    for kv in kv_dtypes:
        for combo in combos:
            flags = {fields[tag]: True for tag in combo}
            for family in ATTENTION_KERNELS:
                cfg = base.with_kernel(family).with_variants(kv_dtype=kv, **flags)
                out[cfg.name] = cfg
        for cfg in (KernelConfig.for_pages("write_kv", base.dtype, base.num_kv_heads, base.head_dim, base.page_size,
                                           kv),
                    KernelConfig.for_pages("copy_pages", kv, base.num_kv_heads, base.head_dim, base.page_size)):
            out[cfg.name] = cfg
    return out


def _bound(op):
    """``op`` from tvm_paged.ops, running on the library's kernels."""

    @functools.wraps(op)
    def method(self, *args, **kwargs):
        with ops.use_kernels(self._kernel):
            return op(*args, **kwargs)

    method.__doc__ = f"{op.__doc__}\n\n(Runs on this library's kernels; see :func:`tvm_paged.ops.{op.__name__}`.)"
    return method


class PagedLibrary:
    """One exported configuration's kernels, loaded. Build it with :func:`load`.

    ``config``: the plain decode KernelConfig of the export; ``device_type``: ``"cpu"`` or ``"cuda"``;
    ``manifest``: the manifest as a dict; ``kernels``: the names of the kernels the library holds (their configs:
    ``configs``); ``kv_dtypes``: the cache dtypes it serves; ``variants``: its attention-variant combinations
    (tag tuples, ``()`` the plain kernels).
    """

    def __init__(self, manifest: dict, path: Path, config: KernelConfig, functions: dict, module):
        self.manifest = manifest
        self.path = path
        self.config = config
        self.device_type = "cuda" if manifest["target"]["kind"] == "cuda" else "cpu"
        self.kv_dtypes = tuple(manifest["config"]["kv_dtypes"])
        self.variants = tuple(tuple(c) for c in manifest["config"]["variants"])
        self._functions = functions  # KernelConfig -> function
        self._module = module  # keeps the library open while its functions live

    @property
    def kernels(self) -> tuple[str, ...]:
        return tuple(cfg.name for cfg in self._functions)

    @property
    def configs(self) -> tuple[KernelConfig, ...]:
        return tuple(self._functions)

    def __repr__(self) -> str:
        return (f"PagedLibrary({self.manifest['config']['name']}, target={self.manifest['target']['key']}, "
                f"kv_dtypes={list(self.kv_dtypes)}, variants={['+'.join(v) or 'plain' for v in self.variants]}, "
                f"path={str(self.path)!r})")

    def _kernel(self, cfg: KernelConfig, device):
        """ops' kernel provider: the library's function for exactly ``cfg``, after checking it fits the export
        (device, shapes and dtypes, cache dtype, attention variants); a ``ValueError`` naming what was asked and
        what the library holds otherwise, before any kernel runs."""
        arg = "q" if cfg.kernel in ATTENTION_KERNELS else "k_cache"
        if device.type != self.device_type:
            raise ValueError(f"{arg}: tensors on {device}, but this library's kernels run on {self.device_type} "
                             f"({self.manifest['target']['key']})")
        fn = self._functions.get(cfg)
        if fn is not None:
            return fn
        want = self.config.with_kernel(cfg.kernel)
        # copy_pages' dtype is the caches'; its shapes are checked here, its cache dtype below.
        dtype_field = () if cfg.kernel == "copy_pages" else (("dtype", arg),)
        for field, name in (*dtype_field, ("num_kv_heads", "k_cache"), ("num_qo_heads", "q"), ("head_dim", arg),
                            ("page_size", "k_cache")):
            got, expected = getattr(cfg, field), getattr(want, field)
            if got != expected:
                raise ValueError(f"{name}: {field} {got} does not match the exported configuration "
                                 f"{self.manifest['config']['name']} ({field} {expected})")
        if cfg.kv_dtype not in self.kv_dtypes:
            fp8 = f"; re-export with --kv-dtype {cfg.kv_dtype}" if cfg.kv_dtype in FP8_DTYPES else ""
            raise ValueError(f"k_cache: dtype {cfg.kv_dtype} does not match the exported configuration "
                             f"{self.manifest['config']['name']} (its caches: {', '.join(self.kv_dtypes)}){fp8}")
        held = [c.name for c in self._functions if c.kernel == cfg.kernel and c.kv_dtype == cfg.kv_dtype]
        words = " + ".join(_VARIANT_WORDS[field] for field, _ in VARIANTS if getattr(cfg, field)) or "no variant"
        caches = f" for {cfg.kv_dtype} caches" if cfg.is_fp8 else ""
        raise ValueError(f"this library has no {cfg.kernel} kernel with {words}{caches} ({cfg.name}); it holds: "
                         f"{', '.join(held)}; re-export with --variants {'+'.join(cfg.variants)}"
                         + (f" --kv-dtype {cfg.kv_dtype}" if cfg.is_fp8 else ""))

    def activate(self):
        """A context manager: within it, this thread's functional API (and so :class:`~tvm_paged.PagedKVCache`)
        runs this library's kernels instead of compiling its own; every call still checks its tensors against the
        exported configuration."""
        return ops.use_kernels(self._kernel)

    def _page_size(self, page_size):
        if page_size is not None and page_size != self.config.page_size:
            raise ValueError(f"page_size: {page_size} does not match the exported configuration "
                             f"{self.manifest['config']['name']} (page_size {self.config.page_size})")
        return self.config.page_size

    paged_decode = _bound(ops.paged_decode)
    paged_prefill = _bound(ops.paged_prefill)
    run_decode = _bound(ops.run_decode)
    run_prefill = _bound(ops.run_prefill)
    write_kv = _bound(ops.write_kv)
    copy_pages = _bound(ops.copy_pages)

    def plan_decode(self, block_table, seq_lens, *, num_pages: int, page_size: int | None = None, device=None,
                    window_left: int = -1, batch_invariant: bool = False):
        """:func:`tvm_paged.ops.plan_decode` with the exported page size."""
        return ops.plan_decode(block_table, seq_lens, page_size=self._page_size(page_size), num_pages=num_pages,
                               device=device, window_left=window_left, batch_invariant=batch_invariant)

    def plan_prefill(self, block_table, seq_lens, cu_seqlens_q, total_q: int, *, num_pages: int,
                     page_size: int | None = None, device=None, window_left: int = -1, batch_invariant: bool = False):
        """:func:`tvm_paged.ops.plan_prefill` with the exported page size."""
        return ops.plan_prefill(block_table, seq_lens, cu_seqlens_q, total_q, page_size=self._page_size(page_size),
                                num_pages=num_pages, device=device, window_left=window_left,
                                batch_invariant=batch_invariant)
