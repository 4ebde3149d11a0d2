"""Reading built libraries without TVM: ELF files, TVM's embedded module tree, CUDA device code, file digests.

The loader checks a library with this module before TVM opens it, and export and the tests describe what a library
holds with it. It imports nothing but the standard library, and the ELF reader is written by hand: the loader runs
on edge devices where packages are installed from wheel files with only TVM's runtime and numpy.
"""

from __future__ import annotations

import hashlib
import platform
import re
import struct
from pathlib import Path

MANIFEST = "manifest.json"
# 2: parameters recorded from the kernel specs (name, role, dtype, shape). 3: kernels keyed by config name, each
# with its family, variant tags, cache dtype and full signature; the config lists the kv_dtypes and variants.
FORMAT = "tvm_paged-export/3"

LIBRARY_BIN_SYMBOL = "__tvm_ffi__library_bin"

_ELF_MACHINES = {3: "x86", 40: "arm", 62: "x86-64", 183: "aarch64", 190: "cuda", 243: "riscv"}
_FATBIN_MAGIC = b"\x50\xed\x55\xba"
_FATBIN_KINDS = {1: "ptx", 2: "cubin"}


# Other spellings of an architecture (``uname -m``, the first part of an LLVM triple) -> inspect_library's words.
_ARCH_NAMES = {"x86_64": "x86-64", "amd64": "x86-64", "arm64": "aarch64"}


def normalize_arch(name: str) -> str:
    """An architecture in :func:`inspect_library`'s words: ``x86_64``/``amd64`` -> ``x86-64``, ``arm64`` ->
    ``aarch64``; other names unchanged."""
    name = name.lower()
    return _ARCH_NAMES.get(name, name)


def host_machine() -> str:
    """This machine's architecture in :func:`inspect_library`'s words (``x86-64``, ``aarch64``)."""
    return normalize_arch(platform.machine())


class ElfFile:
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
        elf = ElfFile(code)
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
    elf = ElfFile(data)
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
    """The file's SHA-256 as hex, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
