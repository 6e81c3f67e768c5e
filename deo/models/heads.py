"""Projection heads on top of the student backbone.

- ``ProjectionHead``: the SimDINO-style head of the self-distillation branch (MS path).
- ``TokenHead`` / ``DistillHeads``: map the student's RGB-path features to the optical VFM's
  width, one head per distilled target (``cls``, ``patch_final``, ``patch_mid``).
- ``to_token_grid``: puts a Swin stage map on the VFM's patch grid in ViT token order.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from itertools import pairwise

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
    """Maps student features to the VFM width, one vector (pooled or token) at a time.

    LayerNorm first: Swin's stage outputs are raw residual streams whose scale differs by
    stage, and the cosine loss only cares about direction, so normalising puts every head on
    the same footing. By default a single Linear follows (``hidden_dim=None``): a low-capacity
    adapter keeps the work of matching the VFM in the backbone, whose features are what we
    export; ``hidden_dim`` gives a 2-layer GELU MLP for the ablation that wants a freer head.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.LayerNorm(in_dim)]
        if hidden_dim is None:
            layers.append(nn.Linear(in_dim, out_dim))
        else:
            layers += [nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim)]
        self.proj = nn.Sequential(*layers)
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


class DistillHeads(nn.Module):
    """The student-side heads of the VFM-distillation branch, keyed by target name.

    Only switched-on heads are built, so an ablation leaves no unused parameters behind (DDP
    would otherwise need ``find_unused_parameters``) and nothing extra in checkpoints.
    """

    def __init__(
        self,
        student_dims: tuple[int, ...],
        vfm_dim: int,
        switches: HeadSwitches,
        hidden_dim: int | None = None,
    ) -> None:
        """``student_dims`` = (pooled, final stage, mid stage) widths, as
        ``DualEmbedSwin.distill_dims`` gives them."""
        super().__init__()
        if len(student_dims) != 3:
            raise ValueError(
                f"student_dims must be (pooled, final-stage, mid-stage) widths, got {student_dims}"
            )
        pooled_dim, final_dim, mid_dim = student_dims
        in_dims = {"cls": pooled_dim, "patch_final": final_dim, "patch_mid": mid_dim}
        self.heads = nn.ModuleDict(
            {
                f.name: TokenHead(in_dims[f.name], vfm_dim, hidden_dim)
                for f in fields(switches)
                if getattr(switches, f.name)
            }
        )

    def forward(self, feats: StudentFeatures, grid: tuple[int, int]) -> dict[str, Tensor]:
        """{"cls": (B, D), "patch_final": (B, P, D), "patch_mid": (B, P, D)}, P = gh * gw,
        for the heads that exist."""
        out: dict[str, Tensor] = {}
        if "cls" in self.heads:
            out["cls"] = self.heads["cls"](feats.pooled)
        for name, feature_map in (
            ("patch_final", feats.patch_final),
            ("patch_mid", feats.patch_mid),
        ):
            if name in self.heads:
                out[name] = self.heads[name](to_token_grid(feature_map, grid))
        return out
