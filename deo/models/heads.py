"""Projection heads on top of the student backbone.

- ``ProjectionHead``: the SimDINO-style head of the self-distillation branch (MS path).
- ``DistillHeads``: map the student's RGB-path features to the optical VFM's width, one head
  per distilled target (``cls``, ``patch_final``, ``patch_mid``): the authors' DINO-style MLP
  (a ``ProjectionHead`` with the VFM's width as bottleneck), or ``TokenHead`` (LayerNorm +
  Linear) as the low-capacity alternative.
- ``to_token_grid``: puts a Swin stage map on the VFM's patch grid in ViT token order.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from itertools import pairwise
from typing import Literal

import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn

from deo.models.student import StudentFeatures


def _init_linear(module: nn.Module) -> None:
    # DINO/SimDINO head init: small truncated-normal weights, zero bias.
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class ProjectionHead(nn.Module):
    """MLP ``in_dim -> hidden -> ... -> out_dim`` with GELU between layers, output L2-normalised.

    SimDINO's head: DINO's MLP and bottleneck without the weight-normalised prototype layer,
    because the coding-rate loss works on the normalised bottleneck features directly.
    """

    def __init__(
        self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 256, n_layers: int = 3
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(pairwise(dims)):
            layers.append(nn.Linear(d_in, d_out))
            if i < n_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.apply(_init_linear)

    def forward(self, x: Tensor) -> Tensor:
        """(..., in_dim) -> (..., out_dim) on the unit sphere."""
        return F.normalize(self.mlp(x), dim=-1)


class TokenHead(nn.Module):
    """LayerNorm + one Linear to the VFM width: the low-capacity alternative to the MLP head.

    LayerNorm first: Swin's stage outputs are raw residual streams whose scale differs by
    stage, and the cosine loss only cares about direction. A single Linear keeps the work of
    matching the VFM in the backbone, whose features are what we export (``head.distill:
    linear``); the authors use ``ProjectionHead`` instead (``head.distill: mlp``).
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim))
        self.apply(_init_linear)

    def forward(self, x: Tensor) -> Tensor:
        """(..., in_dim) -> (..., out_dim)."""
        return self.proj(x)


def to_token_grid(feature_map: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, C, H, W) -> (B, gh * gw, C): bilinear resize to the VFM's patch grid, row-major.

    Row-major (token ``r * gw + c`` is row ``r``, column ``c``) is the order a ViT flattens
    its patch grid in, so token ``i`` here and VFM patch token ``i`` cover the same place.
    ``grid`` must come from the teacher's token tensor at call time.
    """
    if feature_map.ndim != 4:
        raise ValueError(f"feature_map must be (B, C, H, W), got {tuple(feature_map.shape)}")
    gh, gw = grid
    if gh < 1 or gw < 1:
        raise ValueError(f"grid must be positive, got {grid}")
    if tuple(feature_map.shape[-2:]) != (gh, gw):
        feature_map = F.interpolate(
            feature_map, size=(gh, gw), mode="bilinear", align_corners=False
        )
    return feature_map.flatten(2).transpose(1, 2)


@dataclass(frozen=True)
class HeadSwitches:
    """Which VFM-distillation heads exist; a switched-off head is not built at all."""

    cls: bool = True
    patch_final: bool = True
    patch_mid: bool = True


DistillKind = Literal["mlp", "linear"]


class DistillHeads(nn.Module):
    """The student-side heads of the VFM-distillation branch, keyed by target name.

    ``kind="mlp"`` (the authors' ``DINOHead`` in ``main_dino.py``): ``n_layers`` Linear layers
    with GELU, ``hidden_dim`` wide, bottleneck at the VFM width, L2-normalised output.
    ``kind="linear"``: ``TokenHead``. Patch heads act on each token of the student's stage map
    *before* it is resized to the VFM's grid, as the authors' ``cosine_patch_loss`` does.

    Only switched-on heads are built, so an ablation leaves no unused parameters behind (DDP
    would otherwise need ``find_unused_parameters``) and nothing extra in checkpoints.
    """

    def __init__(
        self,
        student_dims: tuple[int, ...],
        vfm_dim: int,
        switches: HeadSwitches,
        kind: DistillKind = "mlp",
        hidden_dim: int = 2048,
        n_layers: int = 3,
    ) -> None:
        """``student_dims`` = (pooled, final stage, mid stage) widths, as
        ``DualEmbedSwin.distill_dims`` gives them."""
        super().__init__()
        if len(student_dims) != 3:
            raise ValueError(
                f"student_dims must be (pooled, final-stage, mid-stage) widths, got {student_dims}"
            )
        if kind not in ("mlp", "linear"):
            raise ValueError(f"unknown distillation head kind {kind!r}; expected mlp or linear")
        pooled_dim, final_dim, mid_dim = student_dims
        in_dims = {"cls": pooled_dim, "patch_final": final_dim, "patch_mid": mid_dim}

        def head(in_dim: int) -> nn.Module:
            if kind == "mlp":
                return ProjectionHead(in_dim, hidden_dim, vfm_dim, n_layers)
            return TokenHead(in_dim, vfm_dim)

        self.heads = nn.ModuleDict(
            {f.name: head(in_dims[f.name]) for f in fields(switches) if getattr(switches, f.name)}
        )

    def forward(self, feats: StudentFeatures, grid: tuple[int, int] | None) -> dict[str, Tensor]:
        """{"cls": (B, D), "patch_final": (B, P, D), "patch_mid": (B, P, D)}, P = gh * gw,
        for the heads that exist; ``grid=None`` (local views) gives the [cls] only."""
        out: dict[str, Tensor] = {}
        if "cls" in self.heads:
            out["cls"] = self.heads["cls"](feats.pooled)
        if grid is None:
            return out
        for name, feature_map in (
            ("patch_final", feats.patch_final),
            ("patch_mid", feats.patch_mid),
        ):
            if name in self.heads:
                tokens = self.heads[name](feature_map.permute(0, 2, 3, 1))  # (B, H, W, D)
                out[name] = to_token_grid(tokens.permute(0, 3, 1, 2), grid)
        return out

    @property
    def has_cls(self) -> bool:
        """Whether a [cls] head exists (local views are run only for it)."""
        return "cls" in self.heads
