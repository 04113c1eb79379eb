"""The layout's rules that neither ruff nor import-linter checks: no private name imported from
another module, and no module of the package over 450 lines (one job a module)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 450
FIRST_PARTY = {"molmo_backend", "tests"}


def _python_files(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py"))


def private_imports(path: Path) -> list[str]:
    """The ``module._name`` of each ``from module import _name`` in ``path`` where the module is
    the project's own: another module's private name (dunder names such as ``__version__`` are
    public; third-party privates are a different matter)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in FIRST_PARTY:
            found += [
                f"{node.module}.{a.name}"
                for a in node.names
                if a.name.startswith("_") and not a.name.startswith("__")
            ]
    return found


def test_the_check_finds_a_private_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from __future__ import annotations\n"
        "from molmo_backend import __version__\n"
        "from molmo_backend.x import public, _hidden\n"
        "from urllib3.util.timeout import _DEFAULT_TIMEOUT\n"
    )
    assert private_imports(sample) == ["molmo_backend.x._hidden"]


@pytest.mark.parametrize("folder", ["molmo_backend", "tests", "bench"])
def test_no_private_name_is_imported_across_modules(folder):
    offenders = {
        str(p.relative_to(ROOT)): names for p in _python_files(folder) if (names := private_imports(p))
    }
    assert offenders == {}


def test_no_module_of_the_package_is_over_450_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in _python_files("molmo_backend")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}
