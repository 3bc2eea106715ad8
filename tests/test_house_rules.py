"""Static house rules of the package (docs/architecture.md, "House rules"), checked with ``ast``:

(a) no module imports a project module inside a function (``from .x import y``, ``from .. import x``,
    ``import hf_dpdedup...`` in a ``def``): that is how import cycles get hidden. Third-party imports
    at function level (lazy loading of an optional or heavy dependency) are not this rule's business.
(b) no module imports an underscore-prefixed name from another project module, nor reads
    ``module._name`` of a project module it imported: privates stay in their module. A private
    *module* (``privacy/_checks.py``) may be imported by the modules of its own package only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import hf_dpdedup

ROOT = Path(hf_dpdedup.__file__).parent
PACKAGE = "hf_dpdedup"

# Exceptions allowed for now, each with why. An entry that no longer offends fails
# test_allow_lists_hold_only_live_exceptions, so the lists only shrink.
FUNCTION_IMPORT_ALLOWED: set[str] = set()
PRIVATE_IMPORT_ALLOWED: dict[str, set[str]] = {}


def _modules() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def _dotted(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PACKAGE, *parts])


def _resolve(path: Path, node: ast.ImportFrom) -> str | None:
    """The absolute module an ``ImportFrom`` names, or None for a third-party one."""
    if node.level == 0:
        name = node.module or ""
        return name if name == PACKAGE or name.startswith(PACKAGE + ".") else None
    package = _dotted(path).split(".")
    if path.name != "__init__.py":
        package.pop()
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _package_of(module: str, path_is_init: bool) -> str:
    return module if path_is_init else module.rpartition(".")[0]


def function_level_project_imports(path: Path, tree: ast.AST) -> list[str]:
    found = []
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(func):
            if isinstance(node, ast.ImportFrom) and _resolve(path, node) is not None:
                found.append(f"line {node.lineno}: from {'.' * node.level}{node.module or ''} import ... in {func.name}()")
            elif isinstance(node, ast.Import) and any(a.name.split(".")[0] == PACKAGE for a in node.names):
                found.append(f"line {node.lineno}: import {node.names[0].name} in {func.name}()")
    return sorted(set(found))


def private_imports(path: Path, tree: ast.AST) -> list[str]:
    here = _dotted(path)
    here_package = _package_of(here, path.name == "__init__.py")
    found = []
    module_aliases: set[str] = set()  # local names bound to project modules
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = _resolve(path, node)
            if source is None or source == here:
                continue
            private_module = next((p for p in source.split(".") if _is_private(p)), None)
            if private_module is not None and source.rpartition(".")[0] != here_package:
                found.append(f"line {node.lineno}: from private module {source}")
            for alias in node.names:
                if _is_private(alias.name):
                    found.append(f"line {node.lineno}: imports {alias.name} from {source}")
                if (ROOT / Path(*f"{source}.{alias.name}".split(".")[1:])).with_suffix(".py").is_file() or (
                    ROOT / Path(*f"{source}.{alias.name}".split(".")[1:]) / "__init__.py"
                ).is_file():
                    module_aliases.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    if any(_is_private(p) for p in alias.name.split(".")):
                        found.append(f"line {node.lineno}: import {alias.name}")
                    module_aliases.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and _is_private(node.attr)
                and isinstance(node.value, ast.Name) and node.value.id in module_aliases):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return sorted(set(found))


def _excused(rel: str, what: str, allowed: set[str] | dict[str, set[str]]) -> bool:
    if isinstance(allowed, dict):
        return any(f" {name} " in f" {what} " for name in allowed.get(rel, ()))
    return rel in allowed


def _check(rule, allowed: set[str] | dict[str, set[str]]) -> list[str]:
    offenders = []
    for path in _modules():
        rel = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        offenders += [f"{rel} {what}" for what in rule(path, tree) if not _excused(rel, what, allowed)]
    return offenders


def test_no_function_level_imports_of_project_modules():
    """Import project modules at the top of the module; a cycle they would form is a design to fix
    (move the shared code to the module both can import), not an import to hide in a function."""
    assert _check(function_level_project_imports, FUNCTION_IMPORT_ALLOWED) == []


def test_no_module_reaches_into_another_modules_privates():
    """A name another module needs is public API of its module (no leading underscore)."""
    assert _check(private_imports, PRIVATE_IMPORT_ALLOWED) == []


def test_allow_lists_hold_only_live_exceptions():
    def offends(rule, rel: str, names: set[str] | None = None) -> bool:
        path = ROOT / rel
        found = rule(path, ast.parse(path.read_text(encoding="utf-8"))) if path.is_file() else []
        return bool(found) if names is None else all(any(f" {n} " in f" {w} " for w in found) for n in names)

    stale = [rel for rel in FUNCTION_IMPORT_ALLOWED if not offends(function_level_project_imports, rel)]
    stale += [rel for rel, names in PRIVATE_IMPORT_ALLOWED.items() if not offends(private_imports, rel, names)]
    assert stale == [], "remove these entries from the allow-lists: they no longer break the rule"


def test_only_the_demo_uses_the_test_doubles():
    """``hf_dpdedup.testing`` stands in for the outside world (a Hub): the library never needs it."""
    users = []
    for path in _modules():
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("testing/") or rel == "demo.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([_resolve(path, node) or ""] + [f"{_resolve(path, node)}.{a.name}" for a in node.names]
                     if isinstance(node, ast.ImportFrom) else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            if any(n == f"{PACKAGE}.testing" or n.startswith(f"{PACKAGE}.testing.") for n in names):
                users.append(f"{rel} line {node.lineno}")
    assert users == []


# --- the guards catch what they guard ------------------------------------------------------------
@pytest.mark.parametrize("source, expected", [
    ("def f():\n    from .store import member\n", 1),
    ("def f():\n    from ..errors import HfDpDedupError\n", 1),
    ("def f():\n    import hf_dpdedup.store\n", 1),
    ("class C:\n    def m(self):\n        from hf_dpdedup.modeling import DedupedModel\n", 1),
    ("def f():\n    import torch\n    from transformers import AutoConfig\n", 0),  # third party: lazy loading
    ("from .store import member\n", 0),
])
def test_function_level_rule_catches_project_imports_in_functions(source, expected):
    path = ROOT / "serving" / "example.py"
    assert len(function_level_project_imports(path, ast.parse(source))) == expected


@pytest.mark.parametrize("source, expected", [
    ("from ..modeling import _model_class\n", 1),
    ("from .metadata import PrivacyMetadata, _encode_float\n", 1),
    ("def f():\n    from ..privacy.private_data import _Grant\n", 1),
    ("from .. import modeling\nmodeling._model_class\n", 1),
    ("import hf_dpdedup.modeling as m\nm._place\n", 1),
    ("from ..privacy._checks import check_epsilon\n", 1),  # a private module of another package
    ("from .plan import read_plan\nfrom torch import _C\n", 0),  # public name; third-party privates are not ours
    ("from .. import modeling\nmodeling.DedupedModel.__name__\n", 0),
])
def test_private_rule_catches_imports_of_private_names(source, expected):
    path = ROOT / "serving" / "example.py"
    assert len(private_imports(path, ast.parse(source))) == expected


def test_a_private_module_is_importable_within_its_own_package():
    path = ROOT / "privacy" / "svt.py"
    assert private_imports(path, ast.parse("from ._checks import check_epsilon\n")) == []
