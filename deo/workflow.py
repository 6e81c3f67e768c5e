"""Helpers the Snakefile calls at parse time (kept here so they are importable and tested)."""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path
from typing import IO

_RUN_LOCK: list[IO[str]] = []
"""The open flock of this process's run (kept open: the kernel drops it however we die)."""


def prefer_beside_python(executable: str = sys.executable) -> None:
    """Put the directory of the running Python (a venv's bin) first on PATH.

    Jobs then find the ``deo`` command installed beside the Snakemake that runs the workflow
    without the venv being activated; a job's conda environment, once activated, still wins.
    """
    bin_dir = str(Path(executable).parent)
    parts = os.environ.get("PATH", "").split(os.pathsep)
    if parts[0] != bin_dir:
        os.environ["PATH"] = os.pathsep.join([bin_dir, *parts])


def clear_stale_locks(workdir: Path = Path(".")) -> list[Path]:
    """Remove Snakemake's lock files when no other run of this workflow is alive here.

    Snakemake locks a working directory with files in ``.snakemake/locks`` and deletes them when
    it ends; a run killed with SIGKILL (or a lost node) leaves them behind, and every later run
    then stops with LockException until ``snakemake --unlock``. The main Snakemake process of
    each run of this workflow holds an flock on ``.snakemake/deo-run.lock`` for its lifetime,
    which the kernel releases however the process dies: lock files found while that flock is
    free belong to no live run. Returns the files removed.
    """
    state = Path(workdir) / ".snakemake"
    state.mkdir(exist_ok=True)
    handle = open(state / "deo-run.lock", "a")  # noqa: SIM115 - held open for the run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return []  # another run of this workflow is alive: its locks are real
    _RUN_LOCK.append(handle)
    stale = sorted((state / "locks").glob("*.lock"))
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        print(
            f"deo: removed {len(stale)} Snakemake lock file(s) left by a run that was killed",
            file=sys.stderr,
        )
    return stale
