"""The ``tvm-paged export`` command: one configuration's kernels as one shared library plus ``manifest.json``.

    tvm-paged export --target nvidia/jetson-orin-nano --num-qo-heads 32 --num-kv-heads 8 --head-dim 128 \\
        --page-size 16 --dtype float16 --kv-dtype float8_e4m3fn --variants w,w+cap -o DIR

The library holds every kernel of the configuration for each requested cache dtype and attention variant: decode
and prefill for every (cache dtype, variant combination), write_kv and copy_pages for every cache dtype. The base
configuration (caches in ``--dtype``, no variant) is always included; ``--kv-dtype`` adds 8-bit caches
(``float8_e4m3fn``, ``float8_e5m2``) and ``--variants`` adds combinations of attention variants (tags joined by
``+``: ``w`` sliding window, ``cap`` logits soft-cap, ``alibi``, ``sink``; several combinations comma separated or
the option repeated; ``all``: every combination). Each combination is crossed with every cache dtype.

Every kernel is built by ``build.tuned_prim_func`` (the committed tuned schedule when there is one, a variant
falling back to its plain configuration's, else the default) into one IRModule, compiled once for the target (host
included) by :func:`tvm_paged.toolchain.build_library` and written as ``DIR/tvm_paged_<config>_<target key>.so``.
The manifest (format :data:`tvm_paged.binary.FORMAT`) records the configuration and what was requested
(``kv_dtypes``, ``variants``), per kernel (keyed by its config name, which is also its symbol) its family, variant
tags, cache dtype, full parameter signature (``spec.signature(cfg)``) and schedule, the target, the TVM/ffi
versions, the library's SHA-256 and what the library holds (from :func:`tvm_paged.binary.inspect_library`);
:func:`tvm_paged.load` reads it back.

CUDA targets embed compiled device code (a fatbin with SASS for the target's SM only), never source, so the
device needs no CUDA compiler. On a machine with no GPU the export re-runs itself in a child process that loads
a libcuda stub first (see :mod:`tvm_paged.toolchain`).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from . import __version__, build, targets, tuned_knobs
from . import tvm_compat as tc
from .binary import FORMAT, MANIFEST, inspect_library, sha256_file
from .cli import VARIANTS_HELP, output_folder, parse_variants, variant_flags
from .config import ATTENTION_KERNELS, DTYPES, FP8_DTYPES, VARIANTS, KernelConfig
from .spec import SPECS
from .toolchain import (ExportError, build_library, cross_compiler, export_target, host_arch, require_nvcc,
                        run_python_with_cuda_stub)


# ========================================================================================== export
def _as_config(cfg_or_kwargs) -> KernelConfig:
    """A KernelConfig (an attention config: only its shapes and dtype matter here) or a dict of ``dtype,
    num_qo_heads, num_kv_heads, head_dim, page_size`` -> the configuration's plain decode KernelConfig."""
    if isinstance(cfg_or_kwargs, KernelConfig):
        c = cfg_or_kwargs
        if c.kernel not in ATTENTION_KERNELS:
            raise ValueError(f"config: {c.name} has no query heads; pass an attention config or a dict")
        return KernelConfig("decode", c.dtype, c.num_qo_heads, c.num_kv_heads, c.head_dim, c.page_size)
    if isinstance(cfg_or_kwargs, dict):
        keys = ("dtype", "num_qo_heads", "num_kv_heads", "head_dim", "page_size")
        unknown = set(cfg_or_kwargs) - set(keys) - {"name", "kernel"}
        if unknown:
            raise ValueError(f"config: unknown keys {sorted(unknown)} (expected {keys})")
        missing = [k for k in keys if k not in cfg_or_kwargs]
        if missing:
            raise ValueError(f"config: missing {missing}")
        return KernelConfig("decode", *(cfg_or_kwargs[k] for k in keys))
    raise ValueError(f"config: expected a KernelConfig or a dict, got {type(cfg_or_kwargs).__name__}")


def _kv_dtypes(base: KernelConfig, kv_dtypes) -> list[str]:
    """The cache dtypes of an export: the base dtype first, then the requested ones (8-bit), duplicates dropped."""
    if isinstance(kv_dtypes, str):
        kv_dtypes = [kv_dtypes]
    out = [base.dtype]
    for value in kv_dtypes or ():
        for name in str(value).split(","):
            name = name.strip()
            if not name or name in out:
                continue
            if name not in FP8_DTYPES:
                raise ValueError(f"kv_dtype: {name!r} is not a cache dtype of a {base.dtype} configuration (the "
                                 f"base {base.dtype} caches are always included; 8-bit: {', '.join(FP8_DTYPES)})")
            out.append(name)
    return out


def _variant_combos(variants) -> list[dict[str, bool]]:
    """The attention-variant combinations of an export: none (the plain kernels) first, then the requested ones.
    ``variants``: combinations as ``"w+cap"`` strings (a string may list several, comma separated), tag tuples or
    flag dicts."""
    if isinstance(variants, (str, dict)):
        variants = [variants]
    plain = variant_flags("")
    out = [plain]
    for v in variants or ():
        for flags in (parse_variants([v]) if isinstance(v, str) else [variant_flags(v)]):
            if flags not in out:
                out.append(flags)
    return out


def kernel_configs(base: KernelConfig, kv_dtypes: list[str], combos: list[dict[str, bool]]) -> list[KernelConfig]:
    """Every kernel an export holds, in manifest order: per cache dtype, decode and prefill for each variant
    combination, then write_kv and copy_pages."""
    out = []
    for kv in kv_dtypes:
        for flags in combos:
            for family in ATTENTION_KERNELS:
                out.append(base.with_kernel(family).with_variants(kv_dtype=kv, **flags))
        out.append(KernelConfig.for_pages("write_kv", base.dtype, base.num_kv_heads, base.head_dim, base.page_size,
                                          kv))
        out.append(KernelConfig.for_pages("copy_pages", kv, base.num_kv_heads, base.head_dim, base.page_size))
    return out


def config_id(cfg: KernelConfig) -> str:
    """The configuration's name without the kernel: ``f16_h32x8_d128_p16``."""
    return cfg.with_kernel("decode").name[len("decode_"):]


def _target_spec(target) -> str:
    """A string that resolves to the same target in another process."""
    if target is None:
        return "local"
    if isinstance(target, str):
        return target
    if isinstance(target, dict):
        return json.dumps(target)
    return str(target)


def _signature(cfg: KernelConfig, func) -> list[dict]:
    """The manifest's parameter list: the family's spec for ``cfg`` (names, roles, shapes, its variants'
    parameters included), checked against the compiled function's own parameters (count and dtypes), so a builder
    that drifted from its spec never ships."""
    built = tc.buffer_signature(func)
    spec = SPECS[cfg.kernel].signature(cfg)
    if len(built) != len(spec) or any(b["dtype"] != s["dtype"] for b, s in zip(built, spec)):
        raise ExportError(f"{cfg.name}: the kernel takes ({', '.join(b['dtype'] for b in built)}) but its spec "
                          f"says ({', '.join(s['name'] + ': ' + s['dtype'] for s in spec)})")
    return spec


def export(cfg_or_kwargs, target="local", out_dir=".", *, kv_dtypes=None, variants=None,
           _reexec: bool = True) -> dict:
    """Compile one configuration's kernels for ``target`` into one shared library in ``out_dir``, write
    ``out_dir/manifest.json`` and return the manifest.

    ``cfg_or_kwargs``: a KernelConfig or a dict of ``dtype, num_qo_heads, num_kv_heads, head_dim, page_size``; a
    KernelConfig with an 8-bit cache or variants adds those to the request. ``target``: ``"local"``, a TVM tag
    (``nvidia/nvidia-h100``, ``nvidia/jetson-orin-nano``) or a JSON/dict target. ``kv_dtypes``: 8-bit cache dtypes
    to add (``"float8_e4m3fn"``, ``"float8_e5m2"``); the base dtype's caches are always included. ``variants``:
    attention-variant combinations to add, each ``"w+cap"`` (tags ``w``, ``cap``, ``alibi``, ``sink``), a tuple of
    tags or a dict of KernelConfig's flags; the plain kernels are always included. The library holds decode and
    prefill for every (cache dtype, combination) and write_kv and copy_pages for every cache dtype.
    Raises ValueError for a bad configuration, request or target, :class:`ExportError` for a missing toolchain.
    """
    base = _as_config(cfg_or_kwargs)
    kv_request = list(kv_dtypes) if isinstance(kv_dtypes, (list, tuple)) else ([kv_dtypes] if kv_dtypes else [])
    var_request = list(variants) if isinstance(variants, (list, tuple)) else ([variants] if variants else [])
    if isinstance(cfg_or_kwargs, KernelConfig):
        if cfg_or_kwargs.is_fp8:
            kv_request.append(cfg_or_kwargs.kv_dtype)
        if cfg_or_kwargs.variants:
            var_request.append(cfg_or_kwargs.variants)
    kvs = _kv_dtypes(base, kv_request)
    combos = _variant_combos(var_request)
    configs = kernel_configs(base, kvs, combos)
    spec = _target_spec(target)
    tgt = targets.resolve_target(target)
    kind = targets.target_kind(tgt)
    out = Path(out_dir)
    if kind == "cuda":
        require_nvcc()
        cross_compiler(export_target(tgt))  # fail early when the cross toolchain is missing
        if not tc.cuda_codegen_available():
            if not _reexec:
                raise ExportError("TVM's CUDA runtime plugin did not load even with the libcuda stub "
                                  "(is libcudart from the CUDA toolkit installed?)")
            return _export_in_stub_process(base, kvs, combos, spec, out)

    funcs, kernels = {}, {}
    for kcfg in configs:
        func = build.tuned_prim_func(kcfg, tgt)
        tuned = tuned_knobs.lookup(kcfg, tgt)
        schedule = ({"tuned": True, "source": tuned.source, "tuned_for": tuned.config or kcfg.name,
                     "knobs": tuned.knobs} if tuned else {"tuned": False})
        funcs[kcfg.name] = func
        kernels[kcfg.name] = {"symbol": kcfg.name, "family": kcfg.kernel, "variants": list(kcfg.variants),
                              "kv_dtype": kcfg.kv_dtype, "params": _signature(kcfg, func), "schedule": schedule}

    lib_name = f"tvm_paged_{config_id(base)}_{targets.target_key(tgt)}.so"
    lib_path = out / lib_name
    record = build_library(funcs, tgt, lib_path)
    contents = inspect_library(lib_path)
    final_target = export_target(tgt)
    _check_contents(contents, final_target, kind)

    manifest = {
        "format": FORMAT,
        "config": {"name": config_id(base), "dtype": base.dtype, "num_qo_heads": base.num_qo_heads,
                   "num_kv_heads": base.num_kv_heads, "head_dim": base.head_dim, "page_size": base.page_size,
                   "kv_dtypes": kvs,
                   "variants": [[tag for field, tag in VARIANTS if flags[field]] for flags in combos]},
        "target": {"spec": spec, "str": str(final_target), "key": targets.target_key(tgt), "kind": kind,
                   "host_machine": host_arch(final_target),
                   **({"arch": str(tgt.attrs.get("arch"))} if kind == "cuda" else {})},
        "versions": {"tvm": tc.TVM_VERSION, "tvm_ffi": tc.FFI_VERSION, "tvm_paged": __version__,
                     **({"nvcc": record["nvcc"]} if "nvcc" in record else {})},
        "library": {"file": lib_name, "sha256": sha256_file(lib_path), "bytes": lib_path.stat().st_size},
        "contents": contents,
        "kernels": kernels,
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)
    return manifest


def _check_contents(contents: dict, target, kind: str) -> None:
    """The library is what was asked for: host code for the target's architecture, CUDA device code compiled
    for the target's SM (not source)."""
    want = host_arch(target)
    if contents["elf_machine"] != want:
        raise ExportError(f"the library's host code is {contents['elf_machine']}, expected {want}")
    if kind != "cuda":
        return
    arch = str(target.attrs.get("arch", ""))
    sm = int(re.sub(r"\D", "", arch) or 0)
    code = [d for d in contents["device_code"] if d["module"] == "cuda"]
    if not code or code[0]["format"] not in ("fatbin", "cubin") or sm not in code[0]["sm"]:
        found = code[0] if code else "none"
        raise ExportError(f"the library's CUDA code is not compiled device code for {arch}: {found}")


# ====================================================================== CUDA export on a machine with no GPU
_CHILD_SCRIPT = (
    "import json\n"
    "from tvm_paged.export import _child_main\n"
    "sys.exit(_child_main(json.loads(sys.argv[1])))\n"
)


def _child_main(payload: dict) -> int:
    """Entry point of the child process (libcuda stub loaded) that runs a CUDA export on a machine with no GPU."""
    export(payload["config"], payload["target"], payload["out_dir"], kv_dtypes=payload["kv_dtypes"],
           variants=payload["variants"], _reexec=False)
    return 0


def _export_in_stub_process(base: KernelConfig, kvs: list[str], combos: list[dict], spec: str, out: Path) -> dict:
    """Run the export in a child process that loads a libcuda stub first; returns the manifest it wrote."""
    payload = {"config": {k: getattr(base, k) for k in ("dtype", "num_qo_heads", "num_kv_heads", "head_dim",
                                                         "page_size")},
               "kv_dtypes": kvs[1:], "variants": combos[1:], "target": spec, "out_dir": str(out.resolve())}
    proc = run_python_with_cuda_stub(_CHILD_SCRIPT, [json.dumps(payload)])
    if proc.returncode:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise ExportError(f"the CUDA export (child process with a libcuda stub) failed:\n{tail}")
    return json.loads((out / MANIFEST).read_text())


# ========================================================================================== CLI
def add_arguments(parser) -> None:
    """The ``tvm-paged export`` options."""
    parser.add_argument("--target", default="local",
                        help="'local' (this CPU), an Arm CPU (arm/jetson-orin-cpu, aws/graviton3, raspberry-pi/5), "
                             "a TVM tag (nvidia/nvidia-h100, nvidia/jetson-orin-nano, nvidia/jetson-agx-orin-64gb) "
                             "or a JSON target dict")
    parser.add_argument("--num-qo-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--dtype", default="float16", choices=tuple(DTYPES),
                        help="dtype of q and out (and of the base caches); default float16")
    parser.add_argument("--kv-dtype", action="append", default=[], metavar="DTYPE[,DTYPE]",
                        help="also hold kernels for 8-bit caches of this dtype: float8_e4m3fn, float8_e5m2 (comma "
                             "separated or repeated). Caches in --dtype are always included")
    parser.add_argument("--variants", "--variant", action="append", default=[], metavar="COMBO[,COMBO]",
                        dest="variants",
                        help="also hold decode and prefill kernels for these attention-variant combinations, each "
                             "crossed with every cache dtype (comma separated or repeated; 'all': every "
                             f"combination); {VARIANTS_HELP}. A call's options must match one combination exactly "
                             "(--variants w,cap holds window-only and cap-only kernels, not both together: use "
                             "w+cap). The plain kernels are always included")
    parser.add_argument("-o", "--output", required=True, help="output folder (library + manifest.json)")


def run(args) -> int:
    """``tvm-paged export``: export, then print the library and its kernels; 1 on a bad request or toolchain."""
    cfg = {"dtype": args.dtype, "num_qo_heads": args.num_qo_heads, "num_kv_heads": args.num_kv_heads,
           "head_dim": args.head_dim, "page_size": args.page_size}
    try:
        output_folder(args.output, "-o/--output")
        manifest = export(cfg, args.target, args.output, kv_dtypes=getattr(args, "kv_dtype", None) or None,
                          variants=getattr(args, "variants", None) or None)
    except (ValueError, ExportError) as exc:
        print(f"tvm-paged export: error: {exc}", file=sys.stderr)
        return 1
    lib = manifest["library"]
    print(f"{Path(args.output) / lib['file']}  ({lib['bytes']} bytes, sha256 {lib['sha256'][:16]}...)")
    print(f"target {manifest['target']['key']} ({manifest['contents']['elf_machine']} host"
          + "".join(f", {d['format']} sm_{'/'.join(map(str, d['sm']))}" for d in manifest["contents"]["device_code"])
          + ")")
    for name, info in manifest["kernels"].items():
        sched = info["schedule"]
        if sched["tuned"]:
            via = "" if sched.get("tuned_for") in (None, name) else f", knobs of {sched['tuned_for']}"
            text = f"tuned ({sched['source']}{via})"
        else:
            text = "default schedule"
        print(f"  {info['family']:<10} {name}  {text}")
    return 0
