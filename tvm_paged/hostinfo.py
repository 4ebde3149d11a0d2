"""What the operating system reports about this machine's CPU and memory: its name, its last-level cache and the
memory available, read from /proc and /sys (standard library only; each reader returns None where the OS does
not say).

Benchmarks and the tuner's runner size their pools from these, so that what they time is DRAM, not a cache:
machines this project runs on have reported 32 MB and 480 MB of L3, and a constant fits neither.
"""

from __future__ import annotations

import re
from pathlib import Path

_CACHE_ROOT = Path("/sys/devices/system/cpu/cpu0/cache")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _parse_size(text: str) -> int | None:
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", text, flags=re.IGNORECASE)
    return int(m.group(1)) * _UNITS[m.group(2).upper()] if m else None


def last_level_cache_bytes(root: Path = _CACHE_ROOT) -> int | None:
    """Size of the largest-level data or unified cache cpu0 sees (sysfs ``cache/index*``), in bytes."""
    best = None
    for index in sorted(root.glob("index*")):
        try:
            level = int((index / "level").read_text())
            kind = (index / "type").read_text().strip()
            size = _parse_size((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if kind in ("Data", "Unified") and size and (best is None or level > best[0]):
            best = (level, size)
    return best[1] if best else None


def cpu_model_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The CPU's marketing name (``AMD EPYC``, ``Intel(R) Xeon(R) ...``)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(("model name", "Model")):  # x86, and aarch64's "Model"
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def memory_available_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """``MemAvailable``: what can be allocated without swapping."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# When the OS reports no cache size: larger than any last-level cache measured here (480 MB) / 4.
FALLBACK_CACHE_BYTES = 128 << 20


def dram_pool_bytes(*, factor: int = 4, minimum: int = 512 << 20, memory_fraction: float = 0.25) -> int:
    """Bytes a DRAM-honest working set should span: ``factor`` times the last-level cache (and at least
    ``minimum``), capped at ``memory_fraction`` of the memory available."""
    cache = last_level_cache_bytes() or FALLBACK_CACHE_BYTES
    want = max(minimum, factor * cache)
    available = memory_available_bytes()
    if available:
        want = min(want, int(available * memory_fraction))
    return want
