"""What the main install (``bash scripts/install.sh``, no test extra) must bring: everything the
README's commands run, the report's pygments and the DAG picture included."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
OPTIONAL = {"dot"}
"""Not Python: scripts/install.sh installs Graphviz where it can, the README offers Mermaid."""


def readme_commands() -> list[list[str]]:
    """Every command line of the README's bash blocks, split into words, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    lines = [line for block in blocks for line in block.splitlines() if line.strip()]
    return [shlex.split(line, comments=True) for line in lines]


def executables(words: list[str]) -> list[str]:
    """The programs a command line starts (after ``&&`` and ``|`` too; not env assignments)."""
    found, expect = [], True
    for word in words:
        if word in ("&&", "|", "||", ";"):
            expect = True
        elif expect and not re.fullmatch(r"[A-Z_]+=.*", word) and word != "export":
            found.append(word)
            expect = False
        elif word == "export":
            expect = False
    return found


def main_requirements() -> list[Requirement]:
    """The package's own requirements without extras, from pyproject.toml (the source of truth;
    the installed metadata may be an older editable install's)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def closure(requirements: list[Requirement]) -> set[str]:
    """Names of every distribution those requirements pull in, with the extras they ask for."""
    seen: set[str] = set()
    todo = list(requirements)
    while todo:
        req = todo.pop()
        name = req.name.lower().replace("_", "-")
        key = f"{name}[{','.join(sorted(req.extras))}]"
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue
        for text in dist.requires or []:
            sub = Requirement(text)
            envs = [{"extra": extra} for extra in req.extras] or [{"extra": ""}]
            if sub.marker is None or any(sub.marker.evaluate(env) for env in envs):
                todo.append(sub)
    return {key.split("[")[0] for key in seen}


def test_every_readme_program_is_installed() -> None:
    bin_dir = Path(sys.executable).parent
    programs = {p for words in readme_commands() for p in executables(words)}
    assert {".venv/bin/snakemake", "bash"} <= programs, programs
    for program in programs - OPTIONAL:
        if program.startswith(".venv/bin/"):
            assert (bin_dir / Path(program).name).exists(), program
        elif program == "bash":
            continue
        else:
            assert shutil.which(program), program
    scripts = {w for words in readme_commands() for w in words if w.startswith("scripts/")}
    assert scripts and all((ROOT / s).is_file() for s in scripts), scripts


def test_main_install_brings_the_report_and_dag_tools() -> None:
    names = closure(main_requirements())
    assert {"snakemake", "pygments", "jinja2"} <= names, sorted(names)
    assert "pytest" not in names  # the test extra is not needed for any of this


def test_packaging_metadata_uses_an_spdx_license() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "MIT"
    (backend,) = pyproject["build-system"]["requires"]
    assert Requirement(backend).specifier.contains("77")
    assert not Requirement(backend).specifier.contains("76.1")


def test_the_readme_dag_command_needs_no_graphviz(tmp_path: Path) -> None:
    shutil.copy(ROOT / "Snakefile", tmp_path)
    for folder in ("workflow", "config", "envs", "profiles"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    done = subprocess.run(
        [sys.executable, "-m", "snakemake", "--dag", "mermaid-js"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.lstrip().startswith("---") or "flowchart" in done.stdout
    assert "harmonise" in done.stdout and "distill" in done.stdout
