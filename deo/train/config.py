"""The ``train`` and ``teacher`` config sections, typed; one run = defaults + its overrides."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from deo.config import from_dict
from deo.errors import ConfigError
from deo.losses import LossWeights
from deo.models.heads import DistillKind, HeadSwitches
from deo.models.student import StudentConfig
from deo.models.teacher import TeacherConfig


@dataclass(frozen=True)
class Ablation:
    """The paper's ablation rows as switches (Table 4): all on is the full DEO model."""

    vfm_cls: bool = True  # + DINOv3 [cls]
    optical_path: bool = True  # + separate optical path (3-channel RGB patch embedding)
    vfm_patches: bool = True  # + DINOv3 [p]: final and middle-layer patch tokens
    optical_aug: bool = True  # + optical (RGB-only photometric) augmentation
    hr_optical: bool = True  # + high-resolution optical data (fMoW-RGB partner)


@dataclass(frozen=True)
class CropConfig:
    global_size: int = 224
    local_size: int = 96
    n_local: int = 10
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"  # the authors' RandomResizedCrop
    # the 10 channels' mean/std: the stats stage's (data) or the authors' fixed normalize_hr
    normalisation: Literal["data", "authors"] = "data"


@dataclass(frozen=True)
class HeadConfig:
    """The MS projection head; the VFM-distillation heads share its hidden width and depth
    (the authors' ``--hidden_dim``), their bottleneck being the VFM's width."""

    hidden_dim: int = 2048
    out_dim: int = 256
    n_layers: int = 3
    distill: DistillKind = "mlp"  # the authors' DINO-style MLP, or "linear" (LayerNorm + Linear)


@dataclass(frozen=True)
class OptimConfig:
    base_lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: tuple[float, float] = (0.04, 0.4)
    momentum: tuple[float, float] = (0.996, 1.0)
    clip_grad: float = 3.0  # 0: no clipping
    # per_tensor: each parameter's gradient norm clipped to clip_grad (the authors' DINO
    # clip_gradients); global: the norm of all gradients together (clip_grad_norm_)
    clip_mode: Literal["per_tensor", "global"] = "per_tensor"
    # The authors name nothing "last_layer", so their freeze is a no-op: 0 reproduces it.
    freeze_last_layer_epochs: int = 0
    betas: tuple[float, float] = (0.9, 0.999)
    # Weight decay on the relative-position tables (2-D: the authors' param groups decay them);
    # biases and norms (1-D) never decay.
    wd_position_tables: bool = True


@dataclass(frozen=True)
class TrainConfig:
    student: StudentConfig = field(default_factory=StudentConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    crops: CropConfig = field(default_factory=CropConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    ablation: Ablation = field(default_factory=Ablation)
    epochs: int = 100
    batch_size: int = 64  # global batch over all ranks
    # autocast dtype on CUDA, fp16 with a GradScaler (the authors'); CPU runs fp32 and says so
    precision: Literal["bf16", "fp16", "fp32"] = "fp16"
    # The EMA teacher runs in training mode, stochastic depth on (the authors never call
    # teacher.eval()); false: deterministic teacher.
    ema_drop_path: bool = True
    compile: bool = False
    workers: int = 8
    seed: int = 0

    @property
    def effective_loss(self) -> LossWeights:
        """Loss weights with the ablated VFM terms set to 0 (and so not computed)."""
        a = self.ablation
        return replace(
            self.loss,
            alpha_cls=self.loss.alpha_cls if a.vfm_cls else 0.0,
            alpha_final=self.loss.alpha_final if a.vfm_patches else 0.0,
            alpha_mid=self.loss.alpha_mid if a.vfm_patches else 0.0,
        )

    @property
    def head_switches(self) -> HeadSwitches:
        w = self.effective_loss
        return HeadSwitches(
            cls=w.alpha_cls > 0, patch_final=w.alpha_final > 0, patch_mid=w.alpha_mid > 0
        )

    @property
    def uses_vfm(self) -> bool:
        s = self.head_switches
        return s.cls or s.patch_final or s.patch_mid


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override``'s keys replaced recursively (mappings merge, the rest replace)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def run_config(train: dict[str, Any], run: str) -> dict[str, Any]:
    """The plain config of one training run: ``train.defaults`` merged with ``train.runs[run]``."""
    runs = train.get("runs", {})
    if run not in runs:
        raise ConfigError(f"train.runs has no run {run!r}; runs are {sorted(runs)}")
    return deep_merge(train.get("defaults", {}), runs[run] or {})


def parse_train(data: dict[str, Any]) -> TrainConfig:
    return from_dict(TrainConfig, data, "train")


def parse_teacher(data: dict[str, Any]) -> TeacherConfig:
    return from_dict(TeacherConfig, data, "teacher")
