"""Dependencies point one way: soirlab -> analysis -> unlearn -> soir (docs/design.md §2); no module
imports another module's private (underscore) name."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"soir": {"unlearn", "analysis", "soirlab"}, "unlearn": {"analysis", "soirlab"}, "analysis": {"soirlab"}, "soirlab": set()}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_upward_imports(package):
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) & FORBIDDEN[package])
        for path in (ROOT / package).rglob("*.py")
        if imported_packages(path) & FORBIDDEN[package]
    }
    assert not offenders


def private_imports(path: Path) -> list[str]:
    """Names starting with an underscore that `path` imports from a project module."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in FORBIDDEN:
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN) + ["benchmarks"])
def test_no_module_imports_a_private_name(package):
    offenders = {str(p.relative_to(ROOT)): private_imports(p) for p in (ROOT / package).rglob("*.py") if private_imports(p)}
    assert not offenders


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from soirlab.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
