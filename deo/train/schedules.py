"""Per-iteration schedules, built once and looked up by step (DINO-style).

Each schedule is a plain array of length ``epochs * steps_per_epoch``, so resuming at step k
reads exactly the value an uninterrupted run would have used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def cosine(
    start: float, end: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """The authors' ``cosine_scheduler`` (DINO): a linear warm-up from ``warmup_start`` that
    reaches ``start`` on its last step, then ``end + ½(start − end)(1 + cos(π·i/n))`` for the
    remaining ``n`` steps ``i = 0 … n−1`` (so the last value is just above ``end``)."""
    if total_steps <= 0 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps})")
    warmup = np.linspace(warmup_start, start, warmup_steps)
    n = total_steps - warmup_steps
    decay = end + 0.5 * (start - end) * (1 + np.cos(np.pi * np.arange(n) / max(n, 1)))
    return np.concatenate([warmup, decay])


@dataclass(frozen=True)
class Schedules:
    """Learning rate, weight decay, EMA momentum and the last-layer freeze, per step."""

    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    last_layer_frozen: np.ndarray

    def __len__(self) -> int:
        return len(self.lr)

    def at(self, step: int) -> dict[str, float]:
        return {
            "lr": float(self.lr[step]),
            "wd": float(self.weight_decay[step]),
            "momentum": float(self.momentum[step]),
        }


def build_schedules(
    *,
    epochs: int,
    steps_per_epoch: int,
    base_lr: float,
    global_batch: int,
    min_lr: float,
    warmup_epochs: int,
    weight_decay: tuple[float, float],
    momentum: tuple[float, float],
    freeze_last_layer_epochs: int,
) -> Schedules:
    """The authors' schedules; the peak lr follows the linear scaling rule ``base·batch/256``."""
    total = epochs * steps_per_epoch
    peak = base_lr * global_batch / 256
    return Schedules(
        lr=cosine(peak, min_lr, total, min(warmup_epochs * steps_per_epoch, total)),
        weight_decay=cosine(*weight_decay, total),
        momentum=cosine(*momentum, total),
        last_layer_frozen=np.arange(total) < freeze_last_layer_epochs * steps_per_epoch,
    )
