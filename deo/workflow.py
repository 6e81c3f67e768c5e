"""Helpers the Snakefile calls at parse time (kept here so they are importable and tested)."""

from __future__ import annotations

import copy
import fcntl
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from deo.errors import ConfigError

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


EMBEDDED_DEFAULT = "config/config.yaml"
"""The Snakefile's ``configfile:``, relative to the workflow root (where Snakemake runs)."""
SCHEMA = "workflow/schemas/config.schema.yaml"
"""The schema every resolved config must pass, relative to the workflow root."""


def resolve_config(
    configfiles: Sequence[str | Path],
    overrides: Mapping[str, Any] | None = None,
    root: str | Path = ".",
) -> dict[str, Any]:
    """The config every job sees: the ``--configfile`` files (else the embedded default), then
    the ``--config`` overrides.

    Snakemake itself deep-merges ``--configfile`` over the Snakefile's ``configfile:``, so a key
    that the paper's file leaves out keeps the demo's value (its 0.6 M-parameter "Swin-B" once).
    Here the files given replace the embedded default instead of patching it: each must be a
    complete config (or list ``config/config.yaml`` first to patch the demo). They merge in
    order, then the ``--config`` overrides, with Snakemake's own merge; the result is validated
    (schema defaults filled in), so the Snakefile and ``deo config`` see the same dict.
    """
    from snakemake.common.configfile import load_configfile
    from snakemake.utils import update_config

    root = Path(root)
    files = [Path(f) for f in configfiles] or [root / EMBEDDED_DEFAULT]
    config: dict[str, Any] = {}
    for path in files:
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        update_config(config, load_configfile(str(path)))
    update_config(config, copy.deepcopy(dict(overrides or {})))
    _check_complete(config, files)
    _validate(config, root / SCHEMA, files)
    return config


def _check_complete(config: dict[str, Any], files: Sequence[Path]) -> None:
    """A partial file given alone would otherwise fail the schema with no hint of why."""
    missing = [s for s in ("data", "teacher", "train", "evaluate") if s not in config]
    if missing:
        names = " ".join(str(f) for f in files)
        raise ConfigError(
            f"{names}: no {', '.join(missing)} section(s). --configfile files replace "
            f"{EMBEDDED_DEFAULT} rather than patch it, so together they must hold a complete "
            f"config: start from config/paper.yaml or {EMBEDDED_DEFAULT}, or patch the demo "
            f"with --configfile {EMBEDDED_DEFAULT} {names}"
        )


def _validate(config: dict[str, Any], schema: Path, files: Sequence[Path]) -> None:
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    try:
        validate(config, schema=str(schema.resolve()), set_default=True)
    except WorkflowError as e:
        names = " ".join(str(f) for f in files)
        raise ConfigError(f"{names}: the config fails {schema}: {e}") from e


def replace_config(config: dict[str, Any], resolved: Mapping[str, Any]) -> None:
    """Put ``resolved`` in place of Snakemake's ``config`` (same object: rules hold it)."""
    config.clear()
    config.update(copy.deepcopy(dict(resolved)))


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
