"""Helpers the Snakefile calls at parse time (kept here so they are importable and tested)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def prefer_beside_python(executable: str = sys.executable) -> None:
    """Put the directory of the running Python (a venv's bin) first on PATH.

    Jobs then find the ``deo`` command installed beside the Snakemake that runs the workflow
    without the venv being activated; a job's conda environment, once activated, still wins.
    """
    bin_dir = str(Path(executable).parent)
    parts = os.environ.get("PATH", "").split(os.pathsep)
    if parts[0] != bin_dir:
        os.environ["PATH"] = os.pathsep.join([bin_dir, *parts])
