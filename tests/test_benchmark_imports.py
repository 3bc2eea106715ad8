"""Every name a benchmark imports from the package (or from ``benchmarks/common.py``) exists.

The benchmarks are not run by the suite (they take minutes to hours), so a renamed or moved
function would otherwise break them silently; this checks their imports statically (no benchmark
module is executed: some set environment variables or start servers at import)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p for p in [*BENCHMARKS.glob("*.py"), *BENCHMARKS.glob("families/*.py")] if p.name != "common.py")


def _common():
    spec = importlib.util.spec_from_file_location("benchmarks_common", BENCHMARKS / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(BENCHMARKS)))
def test_benchmark_imports_resolve(script):
    missing = []
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "common":
                module = _common()
            elif node.module.split(".")[0] == "hf_dpdedup":
                module = importlib.import_module(node.module)
            else:
                continue
            for alias in node.names:
                if not hasattr(module, alias.name):
                    try:  # a submodule imported by name (from hf_dpdedup.store import remap)
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        missing.append(f"{node.module}.{alias.name} (line {node.lineno})")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "hf_dpdedup":
                    importlib.import_module(alias.name)
    assert not missing, f"{script.name} imports names that do not exist: {missing}"
