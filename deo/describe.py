"""What a resolved config trains: each run's typed train section, parameter counts, the VFM.

``deo config`` prints this, so a reader checks the model a config builds (a Swin-B of ~87 M
parameters, the VFM's layers) before spending a cluster on it. The counts come from the same
classes training builds, on the meta device: no memory, no initialisation cost.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

from deo.cache.spec import split_teacher_section
from deo.config import to_dict
from deo.errors import ConfigError
from deo.models.teacher import TeacherConfig, resolve_layers
from deo.train.config import TrainConfig, parse_teacher, parse_train, run_config
from deo.train.meta_arch import StudentWithHeads


def describe(config: dict[str, Any], run: str | None = None) -> dict[str, Any]:
    """``{"config", "runs": {name: {"train", "parameters"}}, "vfm"}`` of a resolved config."""
    runs = list(config["train"]["runs"])
    if run is not None and run not in runs:
        raise ConfigError(f"train.runs has no run {run!r}; runs are {sorted(runs)}")
    teacher, _ = split_teacher_section(config["teacher"])
    vfm = describe_vfm(parse_teacher(teacher))
    described = {}
    for name in [run] if run is not None else runs:
        train = parse_train(run_config(config["train"], name))
        described[name] = {
            "train": to_dict(train),
            "parameters": count_parameters(train, vfm["embed_dim"]),
        }
    return {"config": config, "runs": described, "vfm": vfm}


def describe_vfm(cfg: TeacherConfig) -> dict[str, Any]:
    """The VFM's architecture and the 0-based blocks whose tokens are the targets."""
    kwargs = {}
    if cfg.tiny:
        kwargs = {"embed_dim": cfg.tiny_embed_dim, "depth": cfg.tiny_depth}
        kwargs["num_heads"] = cfg.tiny_heads
    if not timm.is_model(cfg.arch):
        raise ConfigError(f"teacher.arch {cfg.arch!r} is not a timm architecture")
    with torch.device("meta"):
        model = timm.create_model(cfg.arch, pretrained=False, **kwargs)
    depth = len(model.blocks)
    mid, final = resolve_layers(cfg, depth)
    return {
        "arch": cfg.arch,
        "tiny": cfg.tiny,
        "embed_dim": int(model.embed_dim),
        "depth": depth,
        "mid_layer": mid,
        "final_layer": final,
        "parameters": _count(model),
    }


def count_parameters(train: TrainConfig, vfm_dim: int) -> dict[str, Any]:
    """Trainable parameters: the student backbone, and each head by name.

    The VFM-distillation heads appear under their target's name (cls, patch_final, patch_mid),
    only where the run's losses build them; ``head`` is the MS projection head.
    """
    with torch.device("meta"):
        model = StudentWithHeads(train, vfm_dim if train.uses_vfm else None)
    heads: dict[str, int] = {}
    for name, module in model.named_children():
        if name == "backbone":
            continue
        inner = getattr(module, "heads", None)
        if isinstance(inner, nn.ModuleDict):
            heads.update({key: _count(head) for key, head in inner.items()})
        else:
            heads[name] = _count(module)
    return {"student": _count(model.backbone), "heads": heads}


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
