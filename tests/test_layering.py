"""The package's layering, stated and checked: which module may depend on which.

The import graph is read from the source (every ``import`` statement, at module level or inside a function), so a
rule breaks the moment someone writes the import, whether or not a test happens to execute it. One rule is also
checked at run time: loading and running an exported library imports neither the tuner nor the compile path.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tvm_paged"
TVM = ("tvm", "tvm_ffi")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _walk_eager(tree):
    """The nodes that run when the module is imported: everything outside function bodies."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        todo.extend(c for c in ast.iter_child_nodes(node)
                    if not isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))


def _imports(path: Path, eager_only: bool = False) -> set[str]:
    """Every module ``path`` imports, absolute (``tvm_paged.build``, ``tvm.tirx``, ``numpy``); with
    ``eager_only``, those imported when the module itself is (not inside its functions)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text())
    for node in (_walk_eager(tree) if eager_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            # ``from . import build`` imports the submodule ``build`` (the package's __init__ runs too, but it only
            # re-exports: it is not a dependency of the importing module).
            subs = [a.name for a in node.names if (PACKAGE.parent / mod.replace(".", "/") / f"{a.name}.py").exists()
                    or (PACKAGE.parent / mod.replace(".", "/") / a.name / "__init__.py").exists()]
            found.update(f"{mod}.{n}" for n in subs)
            if len(subs) < len(node.names):
                found.add(mod)
    found.discard("__future__")
    return found


GRAPH = {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}
EAGER = {_module_name(p): _imports(p, eager_only=True) for p in PACKAGE.rglob("*.py")}


def _closure(module: str, graph: dict = GRAPH) -> set[str]:
    """Everything ``module`` imports, directly or through other modules of the package."""
    seen, todo = set(), [module]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def _is_tvm(mod: str) -> bool:
    return mod.split(".")[0] in TVM


def test_only_tvm_compat_imports_tvm():
    offenders = {m: sorted(d for d in deps if _is_tvm(d)) for m, deps in GRAPH.items()
                 if m != "tvm_paged.tvm_compat"}
    assert not {m: d for m, d in offenders.items() if d}


@pytest.mark.parametrize("module", ["tvm_paged.allocator", "tvm_paged.binary", "tvm_paged.spec", "tvm_paged.config",
                                    "tvm_paged.hostinfo"])
def test_bottom_modules_import_no_tvm(module):
    """The allocator, the binary reader, the specs and the configs work without TVM (and the allocator and binary
    reader without torch)."""
    deps = _closure(module)
    assert "tvm_paged.tvm_compat" not in deps and not any(_is_tvm(d) for d in deps), sorted(deps)
    if module in ("tvm_paged.allocator", "tvm_paged.binary", "tvm_paged.hostinfo"):
        assert not any(d.split(".")[0] == "torch" for d in deps), sorted(deps)


RUNTIME_API = ("tvm_paged.ops", "tvm_paged.plan", "tvm_paged.cache", "tvm_paged.allocator", "tvm_paged.loader",
               "tvm_paged.build", "tvm_paged.export", "tvm_paged.tuning", "tvm_paged.tune", "tvm_paged.demo",
               "tvm_paged.validate")


def test_kernels_import_nothing_of_the_runtime_api():
    for module, deps in GRAPH.items():
        if module.startswith("tvm_paged.kernels"):
            bad = sorted(d for d in deps if d.startswith(RUNTIME_API))
            assert not bad, f"{module} imports {bad}"


COMPILE_OR_TUNE = ("tvm_paged.build", "tvm_paged.kernels", "tvm_paged.tuning", "tvm_paged.tune",
                   "tvm_paged.toolchain", "tvm_paged.export")


def test_loader_imports_neither_tuner_nor_compiler():
    """Importing the loader (and the functional API it runs) pulls in neither; the compile path is imported
    lazily, at the first kernel compiled on demand (``plan.kernel_for``), which the run-time test below checks."""
    bad = sorted(d for d in _closure("tvm_paged.loader", EAGER) if d.startswith(COMPILE_OR_TUNE))
    assert not bad, bad
    lazy = {m for m, deps in GRAPH.items() if any(d.startswith(COMPILE_OR_TUNE) for d in deps - EAGER[m])}
    assert not lazy & (_closure("tvm_paged.loader", EAGER) - {"tvm_paged.plan"}), sorted(lazy)


def test_targets_and_specs_sit_below_build():
    for low in ("tvm_paged.targets", "tvm_paged.spec", "tvm_paged.tvm_compat"):
        bad = sorted(d for d in _closure(low) if d.startswith(COMPILE_OR_TUNE + ("tvm_paged.ops",)))
        assert not bad, f"{low} imports {bad}"


def test_no_import_cycles():
    """Each module's closure excludes itself (package __init__ files aside, which re-export)."""
    cyclic = sorted(m for m in GRAPH if not m.endswith("__init__") and m in _closure(m)
                    and PACKAGE.joinpath(*m.split(".")[1:]).with_suffix(".py").exists())
    assert not cyclic


_RUN_EXPORT = r"""
import json, sys
import numpy as np
import tvm_paged as tp
lib = tp.load(sys.argv[1])
rng = np.random.default_rng(0)
k = rng.standard_normal((6, 5, 1, 16), dtype=np.float32)
v = rng.standard_normal((6, 5, 1, 16), dtype=np.float32)
q = rng.standard_normal((2, 2, 16), dtype=np.float32)
out = lib.paged_decode(q, k, v, np.array([[0, 2], [5, 1]], np.int32), np.array([7, 4], np.int32))
assert np.isfinite(out).all()
print(json.dumps(sorted(m for m in sys.modules if m.startswith("tvm_paged"))))
"""


def test_running_an_export_imports_no_compile_path(tmp_path):
    from tvm_paged.export import export

    export({"dtype": "float32", "num_qo_heads": 2, "num_kv_heads": 1, "head_dim": 16, "page_size": 5}, "local",
           tmp_path)
    proc = subprocess.run([sys.executable, "-c", _RUN_EXPORT, str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not [m for m in loaded if m.startswith(COMPILE_OR_TUNE)], loaded
