"""The layers of ARCHITECTURE.md hold, and the contract that checks them can fail."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

from .processes import REPO, python

FLOWER_APPS = ("flwr.serverapp", "flwr.clientapp", "flwr.simulation", "flwr.server", "flwr.client")


def _imports(path: Path) -> list[str]:
    modules = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules.append(node.module)
        elif isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
    return modules


def _uses(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_the_library_never_imports_the_apps_or_flowers_app_packages():
    """Below the command line, fedrec/ knows neither clients/, server/, simulations/ nor
    Flower's apps (import-linter cannot name an external package's subpackage)."""
    offending = [
        (str(path.relative_to(REPO)), module)
        for path in sorted((REPO / "fedrec").rglob("*.py"))
        if path.name != "cli.py"
        for module in _imports(path)
        if _uses(module, ("clients", "server", "simulations", *FLOWER_APPS))
    ]
    assert offending == []


def test_clients_and_server_never_import_each_other():
    for package, other, flower in (
        ("clients", "server", "flwr.serverapp"),
        ("server", "clients", "flwr.clientapp"),
    ):
        for path in (REPO / package).rglob("*.py"):
            assert not [m for m in _imports(path) if _uses(m, (other, flower))], path


@pytest.mark.timeout(120)
def test_the_layer_contract_holds_and_breaks_on_an_upward_import(tmp_path):
    lint = str(Path(python()).parent / "lint-imports")
    kept = subprocess.run([lint], cwd=REPO, capture_output=True, text=True, check=False)
    assert kept.returncode == 0, kept.stdout[-3000:]
    assert "0 broken" in kept.stdout
    for name in ("fedrec", "clients", "server", "simulations"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    split = tmp_path / "fedrec" / "data" / "split.py"  # the data layer reaching up to a model
    split.write_text(split.read_text() + "\nfrom fedrec.models import base  # noqa\n")
    broken = subprocess.run(
        [lint],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        env={"PYTHONPATH": str(tmp_path), "PATH": str(Path(python()).parent)},
    )
    assert broken.returncode != 0 and "fedrec.data.split -> fedrec.models" in broken.stdout
