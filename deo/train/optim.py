"""Optimiser parameter groups and gradient clipping, the authors' way or switched.

The authors' recipe (DINO's ``utils.get_params_groups`` and ``utils.clip_gradients``, used by
``main_dino.py``): weight decay on every parameter of two or more dimensions that is not a bias
(so also on Swin's relative-position tables and the patch-embedding convolutions), and each
parameter's gradient clipped to its own norm bound.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn

ClipMode = Literal["per_tensor", "global"]

POSITION_TABLE = "relative_position_bias_table"


def param_groups(student: nn.Module, decay_position_tables: bool = True) -> list[dict[str, Any]]:
    """Two AdamW groups: ``apply_wd`` True for weight matrices, False for biases and norms.

    ``decay_position_tables=True`` is the authors' grouping (their rule is only "not a bias and
    not 1-D", and the position tables are 2-D); False exempts the tables as timm's Swin does.
    """
    decay, no_decay = [], []
    for name, p in student.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(".bias")
        skip = skip or (not decay_position_tables and POSITION_TABLE in name)
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False}]


@torch.no_grad()
def clip_gradients(params: Iterable[nn.Parameter], max_norm: float, mode: ClipMode) -> Tensor:
    """Clip gradients in place; returns the norm of all gradients together, before clipping.

    - ``per_tensor`` (the authors'): each gradient ``g`` becomes ``g · min(1, c / (‖g‖ + 1e-6))``
      on its own, so a large gradient in one tensor does not shrink the others.
    - ``global``: ``torch.nn.utils.clip_grad_norm_`` (one factor for all gradients).
    ``max_norm`` 0 clips nothing (the authors' ``--clip_grad 0``).
    """
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return torch.zeros(())
    if mode == "global":
        bound = max_norm if max_norm > 0 else float("inf")
        return torch.nn.utils.clip_grad_norm_(with_grad, bound)
    grads = [p.grad for p in with_grad]
    if mode != "per_tensor":
        raise ValueError(f"unknown clip mode {mode!r}; expected per_tensor or global")
    norms = torch._foreach_norm(grads)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    if max_norm > 0:
        factors = [(max_norm / (n + 1e-6)).clamp(max=1.0) for n in norms]
        torch._foreach_mul_(grads, factors)
    return total
