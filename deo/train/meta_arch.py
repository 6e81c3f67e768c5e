"""``DualTeacherDistillation``: the student, its EMA teacher and the frozen VFM in one module.

The trainable part (student backbone + MS projection head + VFM distillation heads) is one
``StudentWithHeads`` module with a single forward over all views, so it can be wrapped by DDP
as a whole; the EMA teacher and the VFM never receive gradients.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from deo.data.augment import MultiCropBatch
from deo.losses import dual_teacher_loss
from deo.models.heads import DistillHeads, ProjectionHead
from deo.models.student import DualEmbedSwin
from deo.models.teacher import TeacherOutputs, VFMTeacher
from deo.train.config import TrainConfig


@dataclass
class StudentOutputs:
    """Projection-head embeddings of every view, and the optical projections."""

    ms: Tensor  # (V, B, p): global views first, then local views
    # "cls" (V, B, D) with cls_views "all" (global views first), (2, B, D) with "global";
    # "patch_final"/"patch_mid" (2, B, P, D): global views only
    optical: dict[str, Tensor]


class StudentWithHeads(nn.Module):
    """Everything that trains: one forward for all views (DDP needs exactly one per step)."""

    def __init__(self, cfg: TrainConfig, vfm_dim: int | None) -> None:
        super().__init__()
        self.backbone = DualEmbedSwin(cfg.student, with_rgb=cfg.ablation.optical_path)
        self.head = ProjectionHead(
            self.backbone.num_features, cfg.head.hidden_dim, cfg.head.out_dim, cfg.head.n_layers
        )
        self.distill = (
            DistillHeads(
                self.backbone.distill_dims,
                vfm_dim,
                cfg.head_switches,
                kind=cfg.head.distill,
                hidden_dim=cfg.head.hidden_dim,
                n_layers=cfg.head.n_layers,
            )
            if vfm_dim is not None
            else None
        )
        self.optical_path = cfg.ablation.optical_path
        self.cls_all_views = cfg.loss.cls_views == "all"

    def forward(
        self,
        global_ms: Tensor,
        local_ms: Tensor | None,
        global_rgb: Tensor | None,
        local_rgb: Tensor | None,
        grid: tuple[int, int] | None,
    ) -> StudentOutputs:
        """Views are stacked per size: ``global_ms`` (2·B, C, H, W), ``local_ms`` (n·B, ...),
        likewise the optical inputs ``global_rgb`` and ``local_rgb`` (3 channels)."""
        n_global = 2
        batch = global_ms.shape[0] // n_global
        feats = self.backbone(global_ms, "ms")
        local_feats = self.backbone(local_ms, "ms") if local_ms is not None else None
        embeddings = [self.head(feats.pooled)]
        if local_feats is not None:
            embeddings.append(self.head(local_feats.pooled))
        ms = torch.cat(embeddings).unflatten(0, (-1, batch))
        optical: dict[str, Tensor] = {}
        if self.distill is not None and grid is not None:
            # Without a separate optical path the MS features of the views are distilled.
            optical_feats = self.backbone(global_rgb, "rgb") if self.optical_path else feats
            optical = self.distill(optical_feats, grid)
            if self.cls_all_views and self.distill.has_cls and local_feats is not None:
                local_optical = local_feats
                if self.optical_path:
                    if local_rgb is None:
                        raise ValueError("cls_views 'all' needs the optical input of local views")
                    local_optical = self.backbone(local_rgb, "rgb")
                local_cls = self.distill(local_optical, None)["cls"]
                optical["cls"] = torch.cat([optical["cls"], local_cls])
            optical = {name: out.unflatten(0, (-1, batch)) for name, out in optical.items()}
        return StudentOutputs(ms=ms, optical=optical)


class EmaTeacher(nn.Module):
    """The MS-only EMA copy of the student backbone and projection head."""

    def __init__(self, student: StudentWithHeads, cfg: TrainConfig) -> None:
        super().__init__()
        self.backbone = DualEmbedSwin(cfg.student, with_rgb=False)
        self.head = copy.deepcopy(student.head)
        shared = {
            k: v for k, v in student.backbone.state_dict().items() if not k.startswith("rgb_embed.")
        }
        self.backbone.load_state_dict(shared)
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, global_ms: Tensor, n_global: int = 2) -> Tensor:
        """(n_global·B, C, H, W) -> (n_global, B, p)."""
        return self.head(self.backbone(global_ms, "ms").pooled).unflatten(0, (n_global, -1))

    @torch.no_grad()
    def update(self, student: StudentWithHeads, momentum: float) -> None:
        """teacher ← m·teacher + (1 − m)·student, parameter by name (the RGB embedding has none)."""
        for part, source in ((self.backbone, student.backbone), (self.head, student.head)):
            params = dict(source.named_parameters())
            mine = list(part.named_parameters())
            torch._foreach_lerp_(
                [p for _, p in mine], [params[name].detach() for name, _ in mine], 1.0 - momentum
            )


class DualTeacherDistillation(nn.Module):
    """Student, EMA teacher and frozen VFM teacher; ``forward`` returns named loss terms."""

    def __init__(
        self, cfg: TrainConfig, vfm: VFMTeacher | None, vfm_dim: int | None = None
    ) -> None:
        """``vfm_dim`` without ``vfm``: the VFM's targets will be passed to ``forward`` (cached
        mode), so only their width is needed here."""
        super().__init__()
        if cfg.uses_vfm and vfm is None and vfm_dim is None:
            raise ValueError("the configured losses need a VFM teacher (or its targets' width)")
        self.cfg = cfg
        self.weights = cfg.effective_loss
        self.ema_drop_path = cfg.ema_drop_path
        dim = vfm.embed_dim if vfm is not None else vfm_dim
        self.student = StudentWithHeads(cfg, dim if cfg.uses_vfm else None)
        self.teacher = EmaTeacher(self.student, cfg)
        # The VFM is frozen and restored from its own weights file: kept out of state_dict.
        self._vfm = [vfm if cfg.uses_vfm else None]
        self.train()

    def train(self, mode: bool = True) -> DualTeacherDistillation:
        """Training mode; the EMA teacher keeps stochastic depth only with ``ema_drop_path``."""
        super().train(mode)
        self.teacher.train(mode and self.ema_drop_path)
        return self

    @property
    def vfm(self) -> VFMTeacher | None:
        return self._vfm[0]

    def vfm_targets(self, global_rgb: list[Tensor]) -> list[TeacherOutputs]:
        """The VFM's outputs for each global view (online mode): its normalised channels 0-2."""
        return [self.vfm(view, normalised=True) for view in global_rgb]

    def forward(
        self,
        views: MultiCropBatch,
        student: nn.Module | None = None,
        targets: list[TeacherOutputs] | None = None,
        world_size: int = 1,
    ) -> dict[str, Tensor]:
        """One step's loss terms. ``student`` is the (possibly DDP-wrapped) trainable module;
        ``targets`` are the VFM outputs of the global views, computed online when omitted."""
        student = student or self.student
        global_ms = torch.cat(views.global_ms)
        local_ms = torch.cat(views.local_ms) if views.local_ms else None
        global_rgb = torch.cat(views.global_rgb)
        local_rgb = torch.cat(views.local_rgb) if views.local_rgb else None
        if self.vfm is not None and targets is None:
            targets = self.vfm_targets(views.global_rgb)
        elif self.cfg.uses_vfm and targets is None:
            raise ValueError("no VFM teacher here: pass its targets (teacher.mode: cached)")
        grid = targets[0].grid if targets else None
        out = student(global_ms, local_ms, global_rgb, local_rgb, grid)
        teacher_ms = self.teacher(global_ms)
        optical = None
        if targets:
            stacked = {
                "cls": torch.stack([t.cls for t in targets]),
                "patch_final": torch.stack([t.patch_final for t in targets]),
                "patch_mid": torch.stack([t.patch_mid for t in targets]),
            }
            optical = {name: (out.optical[name], stacked[name]) for name in out.optical}
        return dual_teacher_loss(out.ms, teacher_ms, optical, self.weights, world_size)
