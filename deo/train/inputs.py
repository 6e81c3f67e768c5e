"""What training feeds the model: the store's samples, their order and their views, in one place.

``deo train`` and ``deo views`` both build their batches here (same dataset, sampler, seed and
``MultiCrop``), so the views ``deo views`` writes are the ones a training run sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from deo.cache.reader import CachedTargets
from deo.data.augment import MultiCrop, MultiCropBatch
from deo.data.loader import PretrainDataset, make_loader
from deo.data.stats import read_stats
from deo.models.teacher import TeacherOutputs
from deo.train.config import TrainConfig


@dataclass
class TrainingData:
    dataset: PretrainDataset
    loader: DataLoader
    multicrop: MultiCrop


def training_data(
    cfg: TrainConfig, store: Path, table: Path, *, rank: int = 0, world_size: int = 1
) -> TrainingData:
    """The training split in the run's batch order (per rank), and the run's views."""
    dataset = PretrainDataset(store, table, split="train", with_rgb=cfg.ablation.hr_optical)
    loader = make_loader(
        dataset,
        cfg.batch_size // world_size,
        workers=cfg.workers,
        seed=cfg.seed,
        rank=rank,
        world_size=world_size,
    )
    return TrainingData(dataset, loader, MultiCrop.for_training(cfg, read_stats(store)))


def view_generator(cfg: TrainConfig, rank: int) -> torch.Generator:
    """The random stream of a rank's views (and cached-view choices); checkpoints save it."""
    return torch.Generator().manual_seed(cfg.seed * 1000 + rank)


def render_views(
    multicrop: MultiCrop,
    batch: dict[str, torch.Tensor],
    generator: torch.Generator,
    device: torch.device,
    cache: CachedTargets | None = None,
) -> tuple[MultiCropBatch, list[TeacherOutputs] | None]:
    """A loader batch's views on ``device`` and, with a teacher cache, the replayed targets.

    Raw integers travel to the device (a half or a quarter of float32's bytes); the views are
    cut, scaled, augmented and normalised there.
    """
    ms = batch["s2"].to(device, non_blocking=True)
    rgb = batch["rgb"].to(device, non_blocking=True) if "rgb" in batch else None
    has_rgb = batch.get("has_rgb")
    if cache is None:
        return multicrop(ms, rgb, has_rgb, generator), None
    # two of the K cached global views, replayed exactly; local views stay fresh
    global_params, targets = cache.draw(batch["index"], generator, device)
    return multicrop(ms, rgb, has_rgb, generator, global_params=global_params), targets
