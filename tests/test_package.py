from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(out.stdout.split())


def test_import_is_light():
    loaded = _modules_after("import spade_sd")
    assert not {"torch", "timm", "lightning", "spatialdata", "scanpy"} & loaded


def test_public_submodules_do_not_import_torch():
    loaded = _modules_after("import spade_sd as sd\nsd.pp, sd.tl, sd.pl, sd.datasets, sd.GenePanel")
    assert "spatialdata" in loaded and not {"torch", "timm", "lightning", "onnxruntime"} & loaded


def test_public_names():
    import spade_sd as sd

    assert {"pp", "tl", "pl", "datasets", "Backbone", "SpadeModel", "GenePanel"} <= set(dir(sd))
    assert callable(sd.pp.spot_patches) and callable(sd.tl.pretrain) and callable(sd.pl.experts)


# The dependency tiers, lowest first: a module may import from its own tier and the ones below, never above.
TIERS = {
    "spade_sd.utils": 0,
    "spade_sd.config": 1,
    "spade_sd.spots": 2,
    "spade_sd.datasets": 2,
    "spade_sd.metrics": 2,
    "spade_sd.encoders": 3,
    "spade_sd.model": 4,
    "spade_sd.training": 5,
    "spade_sd.pp": 6,
    "spade_sd.tl": 6,
    "spade_sd.pl": 6,
    "spade_sd.cli": 7,
}
SRC = Path(__file__).resolve().parents[1] / "src" / "spade_sd"


def _tier(module: str) -> int:
    for prefix in sorted(TIERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return TIERS[prefix]
    raise AssertionError(f"module {module} belongs to no tier: add it to TIERS")


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, []) for alias in node.names)
    return found


def test_imports_flow_from_higher_tiers_to_lower_ones_only():
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        if path == SRC / "__init__.py":
            continue
        module = "spade_sd." + ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        for line, imported, names in _imports(path):
            if imported == "spade_sd":
                wrong.append(f"{module}:{line} imports {names or 'spade_sd'} from the package root")
            elif imported.startswith("spade_sd.") and _tier(imported) > _tier(module):
                wrong.append(f"{module}:{line} (tier {_tier(module)}) imports {imported} (tier {_tier(imported)})")
    assert not wrong, "\n".join(wrong)


def test_no_private_name_crosses_a_module_line():
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        for line, imported, names in _imports(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if imported.startswith("spade_sd") and private:
                wrong.append(f"{path.relative_to(SRC)}:{line} imports {private} from {imported}")
    assert not wrong, "\n".join(wrong)


def _code_lines(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = function.body
    docstring = isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
    start = (body[1] if docstring and len(body) > 1 else body[0]).lineno
    return function.end_lineno - start + 1


def test_no_function_has_more_than_80_lines_of_code():
    long = [
        f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({_code_lines(node)} lines)"
        for path in sorted(SRC.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _code_lines(node) > 80
    ]
    assert not long, "\n".join(long)
