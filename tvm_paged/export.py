"""The ``tvm-paged export`` command: one configuration's kernels as one shared library plus ``manifest.json``.

    tvm-paged export --target nvidia/jetson-orin-nano --num-qo-heads 32 --num-kv-heads 8 --head-dim 128 \\
        --page-size 16 --dtype float16 -o DIR

Every kernel of the configuration (decode, prefill, write_kv, copy_pages) is built by ``build.tuned_prim_func`` (the
committed tuned schedule when there is one, else the default) into one IRModule, compiled once for the target
(host included) by :func:`tvm_paged.toolchain.build_library` and written as
``DIR/tvm_paged_<config>_<target key>.so``. The manifest records the configuration, each kernel's symbol and
signature, the target, the TVM/ffi versions, the schedules, the library's SHA-256 and what the library holds (from
:func:`tvm_paged.binary.inspect_library`); :func:`tvm_paged.load` reads it back.

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
from .config import KERNELS, KernelConfig
from .spec import SPECS
from .toolchain import (ExportError, build_library, cross_compiler, export_target, host_arch, require_nvcc,
                        run_python_with_cuda_stub)


# ========================================================================================== export
def _as_config(cfg_or_kwargs) -> KernelConfig:
    """A KernelConfig (any kernel: only its shapes matter) or a dict of ``dtype, num_qo_heads, num_kv_heads,
    head_dim, page_size`` -> the configuration's decode KernelConfig."""
    if isinstance(cfg_or_kwargs, KernelConfig):
        c = cfg_or_kwargs
        if c.kernel not in ("decode", "prefill"):
            raise ValueError(f"config: {c.name} has no query heads; pass an attention config or a dict")
        return c.with_kernel("decode")
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
    """The manifest's parameter list: the family's spec (names, roles, shapes), checked against the compiled
    function's own parameters (count and dtypes), so a builder that drifted from its spec never ships."""
    built = tc.buffer_signature(func)
    spec = SPECS[cfg.kernel].signature(cfg)
    if len(built) != len(spec) or any(b["dtype"] != s["dtype"] for b, s in zip(built, spec)):
        raise ExportError(f"{cfg.kernel}: the kernel takes ({', '.join(b['dtype'] for b in built)}) but its spec "
                          f"says ({', '.join(s['name'] + ': ' + s['dtype'] for s in spec)})")
    return spec


def export(cfg_or_kwargs, target="local", out_dir=".", *, _reexec: bool = True) -> dict:
    """Compile every kernel of one configuration for ``target`` into one shared library in ``out_dir``, write
    ``out_dir/manifest.json`` and return the manifest.

    ``cfg_or_kwargs``: a KernelConfig or a dict of ``dtype, num_qo_heads, num_kv_heads, head_dim, page_size``.
    ``target``: ``"local"``, a TVM tag (``nvidia/nvidia-h100``, ``nvidia/jetson-orin-nano``) or a JSON/dict target.
    Raises ValueError for a bad configuration or target, :class:`ExportError` for a missing toolchain.
    """
    base = _as_config(cfg_or_kwargs)
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
            return _export_in_stub_process(base, spec, out)

    funcs, kernels = {}, {}
    for k in KERNELS:
        kcfg = base.with_kernel(k)
        func = build.tuned_prim_func(kcfg, tgt)
        tuned = tuned_knobs.lookup(kcfg, tgt)
        schedule = {"tuned": True, "source": tuned.source, "knobs": tuned.knobs} if tuned else {"tuned": False}
        funcs[kcfg.name] = func
        kernels[k] = {"symbol": kcfg.name, "params": _signature(kcfg, func), "schedule": schedule}

    lib_name = f"tvm_paged_{config_id(base)}_{targets.target_key(tgt)}.so"
    lib_path = out / lib_name
    record = build_library(funcs, tgt, lib_path)
    contents = inspect_library(lib_path)
    final_target = export_target(tgt)
    _check_contents(contents, final_target, kind)

    manifest = {
        "format": FORMAT,
        "config": {"name": config_id(base), "dtype": base.dtype, "num_qo_heads": base.num_qo_heads,
                   "num_kv_heads": base.num_kv_heads, "head_dim": base.head_dim, "page_size": base.page_size},
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
    export(payload["config"], payload["target"], payload["out_dir"], _reexec=False)
    return 0


def _export_in_stub_process(base: KernelConfig, spec: str, out: Path) -> dict:
    """Run the export in a child process that loads a libcuda stub first; returns the manifest it wrote."""
    payload = {"config": {k: getattr(base, k) for k in ("dtype", "num_qo_heads", "num_kv_heads", "head_dim",
                                                         "page_size")},
               "target": spec, "out_dir": str(out.resolve())}
    proc = run_python_with_cuda_stub(_CHILD_SCRIPT, [json.dumps(payload)])
    if proc.returncode:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise ExportError(f"the CUDA export (child process with a libcuda stub) failed:\n{tail}")
    return json.loads((out / MANIFEST).read_text())


# ========================================================================================== CLI
def add_arguments(parser) -> None:
    """The ``tvm-paged export`` options."""
    parser.add_argument("--target", default="local",
                        help="'local' (this CPU), a TVM tag (nvidia/nvidia-h100, nvidia/jetson-orin-nano, "
                             "nvidia/jetson-agx-orin-64gb) or a JSON target dict")
    parser.add_argument("--num-qo-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--dtype", default="float16", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("-o", "--output", required=True, help="output folder (library + manifest.json)")


def run(args) -> int:
    """``tvm-paged export``: export, then print the library and its kernels; 1 on a bad request or toolchain."""
    cfg = {"dtype": args.dtype, "num_qo_heads": args.num_qo_heads, "num_kv_heads": args.num_kv_heads,
           "head_dim": args.head_dim, "page_size": args.page_size}
    try:
        manifest = export(cfg, args.target, args.output)
    except (ValueError, ExportError) as exc:
        print(f"tvm-paged export: error: {exc}", file=sys.stderr)
        return 1
    lib = manifest["library"]
    print(f"{Path(args.output) / lib['file']}  ({lib['bytes']} bytes, sha256 {lib['sha256'][:16]}...)")
    print(f"target {manifest['target']['key']} ({manifest['contents']['elf_machine']} host"
          + "".join(f", {d['format']} sm_{'/'.join(map(str, d['sm']))}" for d in manifest["contents"]["device_code"])
          + ")")
    for k, info in manifest["kernels"].items():
        sched = "tuned (" + info["schedule"]["source"] + ")" if info["schedule"]["tuned"] else "default schedule"
        print(f"  {k:<10} {info['symbol']}  {sched}")
    return 0
