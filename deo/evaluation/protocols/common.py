"""What every protocol shares: split checks, seeding, loaders and the selection rule."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from deo.errors import ConfigError

SPLITS: tuple[str, ...] = ("train", "val", "test")


def check_splits(datasets: Mapping[str, Dataset]) -> None:
    """Every protocol trains on train, selects on val and reports test: all three must exist."""
    missing = [s for s in SPLITS if s not in datasets]
    if missing:
        raise ConfigError(f"the protocol needs the splits {list(SPLITS)}; missing {missing}")
    empty = [s for s in SPLITS if len(datasets[s]) == 0]
    if empty:
        raise ConfigError(f"split(s) {empty} hold no samples")


@contextmanager
def seeded(seed: int, device: str = "cpu") -> Iterator[None]:
    """Run a block on the global RNG seeded with ``seed``, restoring the caller's RNG after.

    Head initialisation and dropout draw from the global RNG; forking it makes a protocol
    run a function of its seed alone, whatever ran before it in the process.
    """
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def sub_seed(*parts: int) -> int:
    """A 63-bit seed mixed from several integers (seed, epoch, sample index ...).

    Hashing the tuple avoids the collisions of arithmetic mixes (seed + epoch gives seed 1,
    epoch 0 the same crops as seed 0, epoch 1).
    """
    return int(np.random.SeedSequence(list(parts)).generate_state(2, np.uint64)[0] >> np.uint64(1))


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int | None = None,
    workers: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A loader that shuffles with its own generator when ``seed`` is given, else keeps order."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=seed is not None,
        generator=generator,
        num_workers=workers,
        drop_last=drop_last,
    )


def best_index(scores: Sequence[float]) -> int:
    """Index of the best score, the first on ties; NaN (an undefined score) ranks last."""
    ranked = [-math.inf if math.isnan(s) else s for s in scores]
    return max(range(len(ranked)), key=lambda i: (ranked[i], -i))
