"""The layer contracts (pyproject's [tool.importlinter]) hold on the tree, and they do fail
on each kind of violation: they are run on a copy of the package with one bad import added."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent
LINT = str(Path(sys.executable).parent / "lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports over the `mlbus` package found first on PYTHONPATH=root."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [LINT, "--no-cache", str(root / "pyproject.toml")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the package (the component links followed) and of the contracts."""
    shutil.copytree(
        REPO / "mlbus", tmp_path / "mlbus", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_tree_keeps_every_contract() -> None:
    result = lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("module", "bad_import", "broken"),
    [
        # the contract imports nothing of mlbus
        ("schemas/_bad.py", "import mlbus.kafka.config", "mlbus.schemas is not allowed"),
        # the kernel imports no component
        ("kafka/_bad.py", "import mlbus.serving.batcher", "mlbus.kafka is not allowed"),
        # a component imports no other component
        ("serving/_bad.py", "import mlbus.trainer.data", "mlbus.serving is not allowed"),
        ("consumers/lineage/_bad.py", "import mlbus.consumers.workflow.policy", "workflow"),
        # nor the composition root
        ("streams/_bad.py", "import mlbus.cli.common", "mlbus.streams is not allowed"),
    ],
)
def test_a_violation_breaks_a_contract(
    tree: Path, module: str, bad_import: str, broken: str
) -> None:
    assert lint(tree).returncode == 0  # the copy itself is clean
    (tree / "mlbus" / module).write_text(f"{bad_import}\n")
    result = lint(tree)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout
    assert broken in result.stdout, result.stdout


def test_a_module_outside_every_layer_breaks_the_contract(tree: Path) -> None:
    """The layers contract is exhaustive: a new kernel-level module must be placed."""
    (tree / "mlbus" / "newthing.py").write_text("x = 1\n")
    result = lint(tree)
    assert result.returncode != 0
    assert "newthing" in result.stdout, result.stdout
