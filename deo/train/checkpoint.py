"""Checkpoints that resume a run exactly: models, optimizer, scaler, step, RNG states, config.

Everything is stored as tensors and plain Python values so the file loads with
``torch.load(weights_only=True)``: a checkpoint is data, never code. Writes are atomic (a
temporary file renamed into place), so a job killed while saving keeps its previous checkpoint.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch

from deo.errors import DataError

FORMAT = 1


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every random stream the training step draws from."""
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "augment": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    generator.set_state(state["augment"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, **state}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; a foreign or damaged file is named."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for damaged or unsafe files
        raise DataError(path, f"not a loadable checkpoint: {e}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DataError(path, f"not a DEO checkpoint of format {FORMAT}")
    return state
