"""How targets are stored: fp16, or int8 with one float32 scale per token.

fp16 keeps 11 significant bits: a relative error below 2**-11 per value, far under the noise of
a training step, at half the bytes of float32. int8 halves that again: each token (a ``D``-vector:
one [cls] or one patch) is scaled by its own ``max|x| / 127`` and rounded, so the error of a
value is at most half a step of its token's scale (measured in ``tests/test_teacher_cache.py`` and
``benchmarks/bench_teacher_cache.py``). Per-token scales cost 4 bytes per ``D`` values.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

Precision = Literal["fp16", "int8"]
TARGETS: tuple[str, ...] = ("cls", "patch_final", "patch_mid")
"""The teacher outputs a cache holds, by ``TeacherOutputs`` field name."""
SCALE = "_scale"
"""Suffix of the per-token scale array stored beside an int8 target."""
INT8_MAX = 127


def stored_dtypes(precision: Precision) -> dict[str, np.dtype]:
    """Suffix -> dtype of the arrays one target is stored as."""
    if precision == "fp16":
        return {"": np.dtype(np.float16)}
    return {"": np.dtype(np.int8), SCALE: np.dtype(np.float32)}


def encode(x: Tensor, precision: Precision) -> dict[str, np.ndarray]:
    """Targets ``(..., D)`` as the arrays to store, by suffix (see ``stored_dtypes``)."""
    x = x.detach().float().cpu()
    if precision == "fp16":
        half = x.half()
        if not torch.isfinite(half).all():
            raise ValueError("targets overflow fp16 (|x| > 65504): store them as int8")
        return {"": half.numpy()}
    scale = x.abs().amax(dim=-1) / INT8_MAX
    # An all-zero token has scale 0: divide by 1 instead, which keeps its codes 0.
    divisor = torch.where(scale > 0, scale, 1.0)[..., None]
    codes = torch.round(x / divisor).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return {"": codes.numpy(), SCALE: scale.numpy()}


def decode(stored: dict[str, np.ndarray]) -> Tensor:
    """float32 targets from the arrays ``encode`` returned (or a selection of their rows)."""
    values = torch.from_numpy(np.ascontiguousarray(stored[""])).float()
    if SCALE in stored:
        values *= torch.from_numpy(np.ascontiguousarray(stored[SCALE]))[..., None]
    return values
