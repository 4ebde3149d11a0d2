"""Reading the machine's cache and memory from the OS, on fake /sys and /proc trees (the real ones differ between
the machines this runs on: 32 MB and 480 MB of L3 have both been seen)."""

from __future__ import annotations

from tvm_paged import hostinfo


def _cache(root, index, level, kind, size):
    d = root / f"index{index}"
    d.mkdir(parents=True)
    (d / "level").write_text(f"{level}\n")
    (d / "type").write_text(f"{kind}\n")
    (d / "size").write_text(f"{size}\n")


def test_last_level_cache_is_the_highest_data_or_unified_level(tmp_path):
    _cache(tmp_path, 0, 1, "Data", "48K")
    _cache(tmp_path, 1, 1, "Instruction", "32K")
    _cache(tmp_path, 2, 2, "Unified", "2048K")
    _cache(tmp_path, 3, 3, "Unified", "491520K")  # the Xeon's 480 MB
    assert hostinfo.last_level_cache_bytes(tmp_path) == 480 << 20


def test_cache_sizes_in_other_units_and_missing_trees(tmp_path):
    _cache(tmp_path, 0, 2, "Unified", "1M")
    _cache(tmp_path, 1, 4, "Instruction", "64M")  # not data: ignored
    assert hostinfo.last_level_cache_bytes(tmp_path) == 1 << 20
    assert hostinfo.last_level_cache_bytes(tmp_path / "absent") is None


def test_cpu_name_and_memory(tmp_path):
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t: fpu\n")
    (tmp_path / "meminfo").write_text("MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n")
    assert hostinfo.cpu_model_name(tmp_path / "cpuinfo") == "AMD EPYC"
    assert hostinfo.memory_available_bytes(tmp_path / "meminfo") == 20000000 * 1024
    assert hostinfo.cpu_model_name(tmp_path / "none") is None


def test_pool_is_four_caches_within_the_memory_cap(monkeypatch):
    monkeypatch.setattr(hostinfo, "last_level_cache_bytes", lambda: 480 << 20)
    monkeypatch.setattr(hostinfo, "memory_available_bytes", lambda: 24 << 30)
    assert hostinfo.dram_pool_bytes() == 4 * (480 << 20)
    monkeypatch.setattr(hostinfo, "memory_available_bytes", lambda: 4 << 30)
    assert hostinfo.dram_pool_bytes() == 1 << 30  # a quarter of what is available
    monkeypatch.setattr(hostinfo, "last_level_cache_bytes", lambda: 32 << 20)
    monkeypatch.setattr(hostinfo, "memory_available_bytes", lambda: 24 << 30)
    assert hostinfo.dram_pool_bytes() == 512 << 20  # never below the minimum
