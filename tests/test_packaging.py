"""The package as a user installs it: a wheel built from the project, installed in a fresh venv outside the
repository, finds the committed schedules inside the package, and ``tvm-paged tune`` writes to the user's folder,
which later lookups search first.

The fresh venv reaches the dependencies (TVM, numpy, torch, the tuner's) through a ``.pth`` line to this venv's
site-packages: only tvm_paged itself comes from the wheel, and nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# A committed schedule the wheel must carry, and the target it was tuned for.
SHIPPED = REPO / "schedules" / "llvm-znver3-2c" / "decode_f16_h32x8_d128_p16.json"


def test_every_package_folder_is_in_the_wheel():
    """pyproject lists packages explicitly (the schedules folder is mapped into the package): a new subpackage
    must be listed too, or the wheel silently lacks it."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "tvm_paged").rglob("__init__.py")}
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
    assert "tvm_paged._schedules" in listed


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python of a fresh venv with the wheel installed, a HOME for it, a working folder outside the repo)."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp / "dist"), str(REPO)], check=True, capture_output=True)
    wheel, = (tmp / "dist").glob("tvm_paged-*.whl")
    venv.create(tmp / "venv", with_pip=False)
    python = tmp / "venv" / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True)
    home, work = tmp / "home", tmp / "work"
    home.mkdir()
    work.mkdir()
    return python, home, work


def _run(installed, code: str) -> dict:
    python, home, work = installed
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TVM_PAGED_", "XDG_", "PYTHON"))}
    env["HOME"] = str(home)
    done = subprocess.run([str(python), "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_wheel_ships_the_committed_schedules(installed):
    python, home, work = installed
    got = _run(installed, """
import json, tvm_paged
from tvm_paged import tuned_knobs, tvm_compat as tc
from tvm_paged.config import KernelConfig
cfg = KernelConfig("decode", "float16", 32, 8, 128, 16)
found = tuned_knobs.lookup(cfg, tc.Target({"kind": "llvm", "mcpu": "znver3", "num-cores": 2}))
print(json.dumps({"package": tvm_paged.__file__, "shipped": str(tuned_knobs.packaged_dir()),
                  "dirs": [str(d) for d in tuned_knobs.search_dirs()],
                  "source": found and found.source, "knobs": found and found.knobs}))
""")
    package = Path(got["package"]).parent
    assert REPO not in package.parents, "tvm_paged came from the checkout, not the wheel"
    assert got["shipped"] == str(package / "_schedules")
    assert got["dirs"] == [str(home / ".cache" / "tvm_paged" / "schedules"), got["shipped"]]
    assert got["source"] == str(package / "_schedules" / "llvm-znver3-2c" / SHIPPED.name)
    assert got["knobs"] == json.loads(SHIPPED.read_text())["knobs"]


@pytest.mark.slow
def test_tune_from_the_wheel_writes_the_user_folder(installed):
    """A tune run where the user stands writes nothing there: the schedule and the log land under
    ~/.cache/tvm_paged, and the next lookup finds that schedule."""
    python, home, work = installed
    tune = [str(python.parent / "tvm-paged"), "tune", "--num-qo-heads", "4", "--num-kv-heads", "2", "--head-dim",
            "64", "--page-size", "8", "--dtype", "float32", "--buckets", "2x8", "--trials", "2", "--per-round", "2",
            "--pool-mb", "4", "--repeat", "2", "--min-repeat-ms", "5", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TVM_PAGED_", "XDG_", "PYTHON"))}
    done = subprocess.run(tune, cwd=work, env={**env, "HOME": str(home)}, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert list(work.iterdir()) == []
    got = _run(installed, """
import json
from tvm_paged import targets, tuned_knobs
from tvm_paged.config import KernelConfig
target = targets.resolve_target("local")
found = tuned_knobs.lookup(KernelConfig("decode", "float32", 4, 2, 64, 8), target)
print(json.dumps({"key": targets.target_key(target), "source": found and found.source}))
""")
    user = home / ".cache" / "tvm_paged"
    assert got["source"] == str(user / "schedules" / got["key"] / "decode_f32_h4x2_d64_p8.json")
    assert (user / "tuning_logs" / got["key"] / "decode_f32_h4x2_d64_p8" / "trials.jsonl").is_file()
