"""The layers of docs/architecture.md, enforced: import-linter's contracts in pyproject.toml
(layers, only tracking imports MLflow, no cycles) hold, the contract's layer list is the one the
docs show, and the contract does catch an upward import."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _lint(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    env = {"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "PYTHONPATH": str(pythonpath)}
    return subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
         "--no-cache", "--no-logo"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )


def _contract_layers() -> list[list[str]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c for c in config["contracts"] if c["type"] == "layers"]
    return [re.split(r"\s*[:|]\s*", layer) for layer in layers["layers"]]


def test_the_import_contracts_hold():
    result = _lint(ROOT, ROOT / "src")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "3 kept, 0 broken" in result.stdout


def test_the_contract_is_the_layer_list_of_the_architecture_page():
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("## Layers", 1)[1].split("```", 2)[1]
    documented = []
    for line in block.strip().splitlines():
        names = line.split("  ", 1)[0].split()
        documented.append([n.removesuffix(".py").removesuffix("/") for n in names])
    assert documented == _contract_layers(), "docs/architecture.md's layer list and pyproject.toml's contract differ"


def test_an_upward_import_breaks_the_contract(tmp_path):
    shutil.copytree(ROOT / "src" / "vlzoo", tmp_path / "src" / "vlzoo", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    structures = tmp_path / "src" / "vlzoo" / "structures.py"
    structures.write_text(structures.read_text() + "\nimport vlzoo.build  # noqa: an upward import\n")
    result = _lint(tmp_path, tmp_path / "src")
    assert result.returncode != 0
    assert "vlzoo.structures is not allowed to import vlzoo.build" in result.stdout
