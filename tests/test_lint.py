"""The project's own checks, so CI enforces them: ruff, snakefmt and Snakemake's linter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deo.workflow import prefer_beside_python

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", "."],
        ["ruff", "format", "--check", "."],
        ["snakefmt", "--check", "Snakefile", "workflow"],
        ["snakemake", "--lint"],
    ],
    ids=lambda c: " ".join(c[:2]),
)
def test_check_passes(command: list[str]) -> None:
    done = subprocess.run([str(BIN / command[0]), *command[1:]], cwd=ROOT, capture_output=True)
    assert done.returncode == 0, (done.stdout + done.stderr).decode()[-3000:]


def test_prefer_beside_python(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/usr/bin")
    prefer_beside_python("/opt/venv/bin/python")
    prefer_beside_python("/opt/venv/bin/python")
    assert os.environ["PATH"] == os.pathsep.join(["/opt/venv/bin", "/usr/bin"])
