"""Errors that name the offending input, so a user can find and fix it."""

from __future__ import annotations

from pathlib import Path


class DeoError(Exception):
    """Base class of the pipeline's own errors."""


class DataError(DeoError):
    """An input file (or URL) is unusable; the message names it and says why."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class ConfigError(DeoError):
    """A configuration key is unknown, missing or has the wrong type or value."""
