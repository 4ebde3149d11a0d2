"""Ship one configuration's kernels as one shared library plus ``manifest.json``, for :func:`tvm_paged.load`.

    tvm-paged export --target nvidia/jetson-orin-nano --num-qo-heads 32 --num-kv-heads 8 --head-dim 128 \\
        --page-size 16 --dtype float16 -o DIR

Every kernel of the configuration (decode, prefill, write_kv, copy_pages) is built by ``build.tuned_prim_func`` (the
committed tuned schedule when there is one, else the default) into one IRModule, compiled once for the target
(host included) and written as ``DIR/tvm_paged_<config>_<target key>.so``. The manifest records the
configuration, each kernel's symbol and signature, the target, the TVM/ffi versions, the schedules, the
library's SHA-256 and what the library holds (from :func:`inspect_library`).

CUDA targets embed compiled device code (a fatbin with SASS for the target's SM only), never source, so the
device needs no CUDA compiler. On a machine with no GPU, TVM's CUDA runtime plugin cannot load (it links
``libcuda.so.1``) and TVM silently falls back to embedding source; the export then re-runs itself in a child
process that first loads a stub ``libcuda.so.1`` (built here with gcc, every function returning an error) so the
plugin loads and the build calls our nvcc callback. The stub lives in a temporary folder and is never shipped.
Host code for another architecture (Jetson: aarch64) is linked with Debian's cross gcc (``tools/setup_cross.sh``).

The top of this module imports nothing of TVM: the pure-Python inspector below (ELF, TVM's serialized module
tree, fatbin / CUDA ELF / PTX) is shared with the loader and the tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from .config import KERNELS, KernelConfig
from .spec import SPECS

MANIFEST = "manifest.json"
FORMAT = "tvm_paged-export/1"

LIBRARY_BIN_SYMBOL = "__tvm_ffi__library_bin"


class ExportError(RuntimeError):
    """The export could not produce a library: a missing toolchain, or a build that would not be what was
    asked for (e.g. CUDA source instead of device code)."""


# ============================================================================================ inspector
_ELF_MACHINES = {3: "x86", 40: "arm", 62: "x86-64", 183: "aarch64", 190: "cuda", 243: "riscv"}
_FATBIN_MAGIC = b"\x50\xed\x55\xba"
_FATBIN_KINDS = {1: "ptx", 2: "cubin"}


def host_machine() -> str:
    """This machine's architecture in :func:`inspect_library`'s words (``x86-64``, ``aarch64``)."""
    m = platform.machine().lower()
    return {"x86_64": "x86-64", "amd64": "x86-64", "aarch64": "aarch64", "arm64": "aarch64"}.get(m, m)


class _Elf:
    """Just enough of an ELF file: header, sections, symbols."""

    def __init__(self, data: bytes):
        if data[:4] != b"\x7fELF":
            raise ValueError("not an ELF file")
        self.data = data
        self.is64 = data[4] == 2
        self.end = "<" if data[5] == 1 else ">"
        u = self._u
        self.machine_id = u("H", 18)
        if self.is64:
            self.flags, shoff, shentsize, shnum = u("I", 48), u("Q", 40), u("H", 58), u("H", 60)
        else:
            self.flags, shoff, shentsize, shnum = u("I", 36), u("I", 32), u("H", 46), u("H", 48)
        self.sections = []
        for i in range(shnum):
            o = shoff + i * shentsize
            if self.is64:
                fields = struct.unpack_from(self.end + "IIQQQQIIQQ", data, o)
            else:
                fields = struct.unpack_from(self.end + "IIIIIIIIII", data, o)
            _, sh_type, _, addr, offset, size, link, _, _, entsize = fields
            self.sections.append((sh_type, addr, offset, size, link, entsize))

    def _u(self, fmt: str, offset: int) -> int:
        return struct.unpack_from(self.end + fmt, self.data, offset)[0]

    @property
    def machine(self) -> str:
        return _ELF_MACHINES.get(self.machine_id, f"e_machine {self.machine_id}")

    def symbols(self):
        """(name, value, size, section index) of every symbol in .symtab and .dynsym."""
        for sh_type, _, offset, size, link, entsize in self.sections:
            if sh_type not in (2, 11) or not entsize:  # SHT_SYMTAB, SHT_DYNSYM
                continue
            str_off = self.sections[link][2]
            for o in range(offset, offset + size, entsize):
                if self.is64:
                    name, _, _, shndx, value, sym_size = struct.unpack_from(self.end + "IBBHQQ", self.data, o)
                else:
                    name, value, sym_size, _, _, shndx = struct.unpack_from(self.end + "IIIBBH", self.data, o)
                end = self.data.index(b"\0", str_off + name)
                yield self.data[str_off + name:end].decode("utf-8", "replace"), value, sym_size, shndx

    def symbol_bytes(self, wanted: str) -> bytes | None:
        for name, value, size, shndx in self.symbols():
            if name != wanted or shndx == 0 or shndx >= len(self.sections):
                continue
            sh_type, addr, offset, _, _, _ = self.sections[shndx]
            if sh_type == 8:  # SHT_NOBITS
                return None
            start = offset + value - addr
            return self.data[start:start + size]
        return None

    def undefined_symbols(self) -> list[str]:
        return sorted({name for name, _, _, shndx in self.symbols() if shndx == 0 and name})


class _Reader:
    """TVM's binary stream: little-endian u64 counts and lengths."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def u64(self) -> int:
        if self.pos + 8 > len(self.data):
            raise ValueError("truncated")
        value = struct.unpack_from("<Q", self.data, self.pos)[0]
        self.pos += 8
        return value

    def raw(self) -> bytes:
        n = self.u64()
        if self.pos + n > len(self.data):
            raise ValueError("truncated")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u64_vec(self) -> list[int]:
        n = self.u64()
        if n > len(self.data):
            raise ValueError("bad vector length")
        return [self.u64() for _ in range(n)]


def _parse_library_bin(blob: bytes) -> list[tuple[str, bytes | None]]:
    """The serialized module tree TVM embeds in an exported library: [(kind, payload)] in tree order, the host
    library as ``("_lib", None)``. Layout (TVM 0.27): u64 total bytes, import-tree row pointers and child
    indices (u64 vectors), then per module its kind (string) and, for device modules, its bytes (string)."""
    head = _Reader(blob)
    total = head.u64()
    r = _Reader(head.data[8:8 + total])
    row_ptr = r.u64_vec()
    r.u64_vec()  # child indices
    modules = []
    for _ in range(max(0, len(row_ptr) - 1)):
        kind = r.raw().decode("utf-8", "replace")
        modules.append((kind, None if kind == "_lib" else r.raw()))
    if r.pos != len(r.data):
        raise ValueError("trailing bytes in the module tree")
    return modules


def classify_device_code(code: bytes) -> dict:
    """What a device binary is: ``{"format": "fatbin"|"cubin"|"ptx"|"cuda-source"|"unknown", "sm": [87, ...]}``;
    a fatbin also lists its ``entries`` (kind and SM each)."""
    if code[:4] == _FATBIN_MAGIC:
        _, _, header_size, fat_size = struct.unpack_from("<IHHQ", code, 0)
        entries, o, end = [], header_size, min(len(code), header_size + fat_size)
        while o + 32 <= end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", code, o)
            sm = struct.unpack_from("<I", code, o + 28)[0]
            entries.append({"kind": _FATBIN_KINDS.get(kind, f"kind {kind}"), "sm": sm})
            if entry_header + payload == 0:
                break
            o += entry_header + payload
        return {"format": "fatbin", "entries": entries, "sm": sorted({e["sm"] for e in entries})}
    if code[:4] == b"\x7fELF":
        elf = _Elf(code)
        if elf.machine_id == 190:
            return {"format": "cubin", "sm": [(elf.flags >> 8) & 0xFF]}
        return {"format": f"elf ({elf.machine})", "sm": []}
    text = code[:1 << 20].decode("utf-8", "replace")
    if ".version" in text and ".target" in text:
        return {"format": "ptx", "sm": sorted({int(m) for m in re.findall(r"\.target\s+sm_(\d+)", text)})}
    if "__global__" in text:
        return {"format": "cuda-source", "sm": []}
    return {"format": "unknown", "sm": []}


def _device_payload(kind: str, payload: bytes) -> dict:
    """A device module's payload: its format tag (TVM's ``fmt``) and, last, its code as a length-prefixed blob."""
    info: dict = {"module": kind, "bytes": len(payload)}
    try:
        r = _Reader(payload)
        info["tvm_fmt"] = r.raw().decode("utf-8", "replace")
        start = r.pos
    except ValueError:
        start = 0
    candidates = [p for p in range(start, len(payload) - 7)
                  if struct.unpack_from("<Q", payload, p)[0] == len(payload) - p - 8]
    found = None
    for p in candidates:
        found = classify_device_code(payload[p + 8:])
        if found["format"] != "unknown":
            break
    info.update(found or {"format": "unknown", "sm": []})
    return info


def inspect_library(path) -> dict:
    """What an exported library holds, read without TVM or a GPU.

    Returns ``{"elf_machine": "x86-64"|"aarch64"|..., "modules": [...], "device_code": [{"module": "cuda",
    "format": "fatbin"|"cubin"|"ptx"|"cuda-source", "sm": [87], ...}]}``; ``modules`` is empty when the library
    embeds no module tree (a CPU-only library).
    """
    data = Path(path).read_bytes()
    elf = _Elf(data)
    out: dict = {"elf_machine": elf.machine, "modules": [], "device_code": []}
    blob = elf.symbol_bytes(LIBRARY_BIN_SYMBOL)
    if not blob:
        return out
    try:
        modules = _parse_library_bin(blob)
    except (ValueError, struct.error):
        # An unknown layout: fall back to looking for device code anywhere in the blob.
        i = blob.find(_FATBIN_MAGIC)
        out["modules"] = ["?"]
        if i >= 0:
            out["device_code"].append({"module": "?", **classify_device_code(blob[i:])})
        return out
    out["modules"] = [kind for kind, _ in modules]
    out["device_code"] = [_device_payload(kind, payload) for kind, payload in modules if payload is not None]
    return out


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ============================================================================= CUDA build without a GPU
_STUB_FALLBACK_SYMBOLS = (
    "cuDeviceGetName", "cuFuncSetAttribute", "cuGetErrorName", "cuGetErrorString", "cuLaunchKernelEx",
    "cuModuleGetFunction", "cuModuleLoadData", "cuModuleUnload", "cuTensorMapEncodeTiled",
)


def _driver_symbols() -> list[str]:
    """The CUDA driver functions TVM's CUDA runtime plugin imports (read from the plugin itself)."""
    from . import tvm_compat as tc  # noqa: PLC0415

    plugin = tc.cuda_runtime_plugin()
    if plugin is not None:
        try:
            names = [n for n in _Elf(plugin.read_bytes()).undefined_symbols()
                     if n.startswith("cu") and not n.startswith("cuda")]
            if names:
                return names
        except (ValueError, struct.error, OSError):
            pass
    return list(_STUB_FALLBACK_SYMBOLS)


def build_cuda_stub(folder) -> Path:
    """Build a stub ``libcuda.so.1`` in ``folder``: the driver symbols TVM's CUDA plugin imports, each returning
    CUDA_ERROR_UNKNOWN. Only for building on a machine with no GPU; never ship it."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise ExportError("building CUDA device code on a machine without a GPU needs gcc (for a libcuda stub)")
    folder = Path(folder)
    src = folder / "cuda_stub.c"
    src.write_text("".join(f"int {name}(void) {{ return 999; }}\n" for name in _driver_symbols()))
    out = folder / "libcuda.so.1"
    proc = subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(out), str(src)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise ExportError(f"could not build the libcuda stub: {proc.stderr.strip()}")
    return out


_STUB_PREAMBLE = (
    "import ctypes, sys\n"
    "ctypes.CDLL(sys.argv.pop(1), mode=ctypes.RTLD_GLOBAL)  # before `import tvm`: lets TVM's CUDA plugin load\n"
)


def run_python_with_cuda_stub(script: str, args=(), *, timeout=None) -> subprocess.CompletedProcess:
    """Run ``python -c script *args`` in a fresh process that loads a stub ``libcuda.so.1`` before anything
    imports TVM, so CUDA builds there embed device binaries. Output is captured (text)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    with tempfile.TemporaryDirectory(prefix="tvm_paged_cuda_stub_") as tmp:
        stub = build_cuda_stub(tmp)
        return subprocess.run([sys.executable, "-c", _STUB_PREAMBLE + script, str(stub), *map(str, args)],
                              capture_output=True, text=True, env=env, timeout=timeout)


_CHILD_SCRIPT = (
    "import json\n"
    "from tvm_paged.export import _child_main\n"
    "sys.exit(_child_main(json.loads(sys.argv[1])))\n"
)


def _child_main(payload: dict) -> int:
    export(payload["config"], payload["target"], payload["out_dir"], _reexec=False)
    return 0


def _gencode(arch: str) -> list[str]:
    """nvcc flags for exactly the target's SM: ``sm_90a`` -> ``-gencode arch=compute_90a,code=sm_90a``."""
    m = re.fullmatch(r"sm_(\d+[a-z]?)", arch or "")
    if not m:
        raise ExportError(f"target: CUDA arch {arch!r} is not of the form sm_XY")
    return ["-gencode", f"arch=compute_{m.group(1)},code=sm_{m.group(1)}"]


def _nvcc_version() -> str:
    try:
        out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    m = re.search(r"release [\d.]+, V([\d.]+)", out)
    return m.group(1) if m else "unknown"


# ========================================================================================== the build
def _normalize_arch(arch: str) -> str:
    return {"x86_64": "x86-64", "amd64": "x86-64", "arm64": "aarch64"}.get(arch, arch)


def _export_target(target):
    """The target the library is compiled for: a CUDA target keeps its tag's host (Jetson: aarch64) or gets a
    generic host for this machine's architecture (no ``mcpu``: the library runs on any CPU of that family)."""
    from . import targets  # noqa: PLC0415
    from . import tvm_compat as tc  # noqa: PLC0415

    if targets.target_kind(target) == "cuda" and target.host is None:
        return tc.Target(target, targets.resolve_target({"kind": "llvm"}))
    return target


def _host_arch(target) -> str:
    """Architecture of the target's host code (``x86-64``, ``aarch64``), from its ``mtriple``; this machine's
    when the target does not say."""
    host = target.host if target.host is not None else target
    triple = str(host.attrs.get("mtriple", "") or "")
    return _normalize_arch(triple.split("-")[0]) if triple else host_machine()


def _cross_compiler(target) -> str | None:
    """``aarch64-linux-gnu-gcc`` when the host code is for another architecture than this machine's."""
    arch = _host_arch(target)
    if arch == host_machine():
        return None
    gnu = {"x86-64": "x86_64"}.get(arch, arch)
    cc = f"{gnu}-linux-gnu-gcc"
    if shutil.which(cc) is None:
        raise ExportError(f"target: host code for {arch} needs the cross compiler {cc} "
                          "(install it with tools/setup_cross.sh)")
    return cc


def build_library(funcs: dict, target, path) -> dict:
    """Compile ``{symbol: PrimFunc}`` for ``target`` (host included) into ONE shared library at ``path``.

    CUDA: device code is compiled by nvcc to a fatbin for the target's SM only; needs TVM's CUDA plugin loaded in
    this process (a real ``libcuda.so.1`` or the stub, see :func:`run_python_with_cuda_stub`). Returns
    ``{"cross_compiler": ..., "nvcc": ...}``."""
    from . import targets  # noqa: PLC0415
    from . import tvm_compat as tc  # noqa: PLC0415

    target = _export_target(target)
    kind = targets.target_kind(target)
    cross_cc = _cross_compiler(target)
    record: dict = {"cross_compiler": cross_cc}
    if kind == "cuda":
        if shutil.which("nvcc") is None:
            raise ExportError("a CUDA export needs nvcc on the PATH to compile device code")
        if not tc.cuda_codegen_available():
            raise ExportError("TVM's CUDA runtime plugin is not loaded in this process, so the build would embed "
                              "CUDA source; run the export through tvm_paged.export.export (which re-runs itself "
                              "with a libcuda stub) or on a machine with a CUDA driver")
        gencode = _gencode(str(target.attrs.get("arch", "")))
        record["nvcc"] = _nvcc_version()
        record["gencode"] = gencode

        def compile_cuda(code):
            return tc.nvcc_fatbin(code, gencode)

        with target, tc.cuda_compile_callback(compile_cuda):
            ex = tc.compile_module(tc.ir_module(funcs), target)
        if "cuda" not in tc.imported_module_kinds(ex):
            raise ExportError("the CUDA build holds no CUDA module: a kernel without thread bindings was compiled "
                              "to host code")
    else:
        with target:
            ex = tc.compile_module(tc.ir_module(funcs), target)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        tc.export_library(ex, tmp, cross_cc)
        os.chmod(tmp, 0o755)  # mkstemp made it private
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return record


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
    from . import tvm_compat as tc  # noqa: PLC0415

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
    A kernel whose builder module does not exist yet is left out and listed under ``"missing"``.
    Raises ValueError for a bad configuration or target, :class:`ExportError` for a missing toolchain.
    """
    from . import __version__, build, targets, tuned_knobs  # noqa: PLC0415
    from . import tvm_compat as tc  # noqa: PLC0415

    base = _as_config(cfg_or_kwargs)
    spec = _target_spec(target)
    tgt = targets.resolve_target(target)
    kind = targets.target_kind(tgt)
    out = Path(out_dir)
    if kind == "cuda":
        if shutil.which("nvcc") is None:
            raise ExportError("a CUDA export needs nvcc on the PATH to compile device code")
        _cross_compiler(_export_target(tgt))  # fail early when the cross toolchain is missing
        if not tc.cuda_codegen_available():
            if not _reexec:
                raise ExportError("TVM's CUDA runtime plugin did not load even with the libcuda stub "
                                  "(is libcudart from the CUDA toolkit installed?)")
            return _export_in_stub_process(base, spec, out)

    funcs, kernels, missing = {}, {}, {}
    for k in KERNELS:
        kcfg = base.with_kernel(k)
        try:
            func = build.tuned_prim_func(kcfg, tgt)
        except ModuleNotFoundError as exc:
            if not (exc.name or "").startswith("tvm_paged.kernels."):
                raise
            missing[k] = f"no kernel builder for this target yet ({exc.name} is not present)"
            continue
        tuned = tuned_knobs.lookup(kcfg, tgt)
        schedule = {"tuned": True, "source": tuned.source, "knobs": tuned.knobs} if tuned else {"tuned": False}
        funcs[kcfg.name] = func
        kernels[k] = {"symbol": kcfg.name, "params": _signature(kcfg, func), "schedule": schedule}
    if not funcs:
        raise ExportError(f"no kernel could be built for {targets.target_key(tgt)}: {missing}")

    lib_name = f"tvm_paged_{config_id(base)}_{targets.target_key(tgt)}.so"
    lib_path = out / lib_name
    record = build_library(funcs, tgt, lib_path)
    contents = inspect_library(lib_path)
    final_target = _export_target(tgt)
    _check_contents(contents, final_target, kind)

    manifest = {
        "format": FORMAT,
        "config": {"name": config_id(base), "dtype": base.dtype, "num_qo_heads": base.num_qo_heads,
                   "num_kv_heads": base.num_kv_heads, "head_dim": base.head_dim, "page_size": base.page_size},
        "target": {"spec": spec, "str": str(final_target), "key": targets.target_key(tgt), "kind": kind,
                   "host_machine": _host_arch(final_target),
                   **({"arch": str(tgt.attrs.get("arch"))} if kind == "cuda" else {})},
        "versions": {"tvm": tc.TVM_VERSION, "tvm_ffi": tc.FFI_VERSION, "tvm_paged": __version__,
                     **({"nvcc": record["nvcc"]} if "nvcc" in record else {})},
        "library": {"file": lib_name, "sha256": sha256_file(lib_path), "bytes": lib_path.stat().st_size},
        "contents": contents,
        "kernels": kernels,
        "missing": missing,
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)
    return manifest


def _check_contents(contents: dict, target, kind: str) -> None:
    """The library is what was asked for: host code for the target's architecture, CUDA device code compiled
    for the target's SM (not source)."""
    want = _host_arch(target)
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


def _export_in_stub_process(base: KernelConfig, spec: str, out: Path) -> dict:
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
    for k, why in manifest["missing"].items():
        print(f"  {k:<10} not exported: {why}")
    return 0
