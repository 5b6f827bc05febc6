"""Every third-party module that src/, tutorials/ and tests/ import comes from a dependency pyproject.toml declares.

A fresh ``pip install -e .`` (the README's demo command) installs only ``[project].dependencies``; what the
package or its demo imports must be there, not merely in the ``test`` extra (igraph once was: the demo ended in
``ImportError: Please install the igraph package``). The tests may also use the ``test`` extra.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
FIRST_PARTY = {"spade_sd"}
# modules that a call imports inside another package: (function name, its flavor= argument) -> module.
# sc.tl.leiden(flavor="igraph") needs igraph although no file imports it; without flavor scanpy uses leidenalg.
BACKENDS = {
    ("leiden", "igraph"): "igraph",
    ("leiden", "leidenalg"): "leidenalg",
    ("leiden", None): "leidenalg",
    ("louvain", "igraph"): "igraph",
    ("louvain", "vtraag"): "louvain",
    ("louvain", None): "louvain",
    ("highly_variable_genes", "seurat_v3"): "skmisc",
    ("highly_variable_genes", "seurat_v3_paper"): "skmisc",
}


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(requirements: list[str]) -> set[str]:
    return {_normalize(re.split(r"[\s<>=!~;\[(@]", requirement, maxsplit=1)[0]) for requirement in requirements}


def _backend(node: ast.Call) -> str | None:
    name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
    flavors = [kw.value for kw in node.keywords if kw.arg == "flavor"]
    flavor = flavors[0].value if flavors and isinstance(flavors[0], ast.Constant) else None
    if flavors and flavor is None:  # a flavor chosen at run time: not checked here
        return None
    return BACKENDS.get((name, flavor))


def _imported_modules(folder: Path) -> dict[str, list[str]]:
    """Top-level modules every .py file under ``folder`` imports, directly or through a backend
    (:data:`BACKENDS`), with the places that import them."""
    local = {path.stem for path in folder.glob("*.py")} | {path.name for path in folder.iterdir() if path.is_dir()}
    found: dict[str, list[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Call) and _backend(node):
                names = [_backend(node)]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in FIRST_PARTY or top in local or top == "__future__":
                    continue
                found.setdefault(top, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def _undeclared(folders: list[str], declared: set[str]) -> list[str]:
    distributions = packages_distributions()
    problems = []
    for folder in folders:
        for module, places in sorted(_imported_modules(ROOT / folder).items()):
            providers = {_normalize(dist) for dist in distributions.get(module, [])}
            if not providers:
                problems.append(
                    f"{module} (used at {places[0]}) is not installed: no installed distribution provides it"
                )
            elif not providers & declared:
                problems.append(f"{module} (used at {places[0]}) comes from {sorted(providers)}, not declared")
    return problems


def test_package_and_demo_imports_are_dependencies():
    problems = _undeclared(["src", "tutorials"], _requirement_names(PYPROJECT["project"]["dependencies"]))
    assert not problems, "\n".join(problems)


def test_test_imports_are_dependencies_or_test_extra():
    declared = _requirement_names(
        PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["test"]
    )
    problems = _undeclared(["tests"], declared)
    assert not problems, "\n".join(problems)


def test_the_scan_sees_imports():
    # guards the test above against passing vacuously
    modules = _imported_modules(ROOT / "src")
    assert {"numpy", "scipy", "geopandas", "torch"} <= set(modules)
    # the demo's sc.tl.leiden(..., flavor="igraph") needs igraph, which no file imports
    assert "igraph" in _imported_modules(ROOT / "tutorials")
