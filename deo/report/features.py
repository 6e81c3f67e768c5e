"""PCA-to-RGB maps of patch features (the paper's Fig. 3 view): student beside VFM teacher.

For a few store samples, the student's MS and RGB paths and the frozen VFM each give patch
features; the first three principal components of each model's tokens (fitted over all shown
samples together, so colours are comparable across samples) become the R, G, B of its map.
The student's mid-stage map is shown: it is the one distilled to the VFM's middle-layer tokens.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor

from deo.data.augment import MultiCrop
from deo.data.loader import PretrainDataset
from deo.data.stats import read_stats
from deo.data.store import open_store
from deo.models.teacher import TeacherConfig, VFMTeacher
from deo.train.finish import student_from_checkpoint


def pca_rgb(features: Tensor, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """(N, C, h, w) features → (N, h, w, 3) in [0, 1]: the top-3 principal components.

    Components are centred over all N·h·w tokens, projected, and each stretched between its
    ``low`` and ``high`` percentiles so one outlier token cannot wash out the map.
    """
    n, c, h, w = features.shape
    tokens = features.permute(0, 2, 3, 1).reshape(-1, c).double()
    tokens = tokens - tokens.mean(0)
    _, _, vh = torch.linalg.svd(tokens, full_matrices=False)
    projected = (tokens @ vh[:3].T).numpy()
    if projected.shape[1] < 3:  # fewer than 3 feature dims or tokens: pad with zeros
        projected = np.pad(projected, ((0, 0), (0, 3 - projected.shape[1])))
    lo, hi = np.percentile(projected, low, axis=0), np.percentile(projected, high, axis=0)
    scaled = np.clip((projected - lo) / np.maximum(hi - lo, 1e-12), 0, 1)
    return scaled.reshape(n, h, w, 3)


@torch.no_grad()
def feature_maps(
    checkpoint: Path,
    teacher: TeacherConfig,
    store: Path,
    table: Path,
    out: Path,
    n_samples: int = 4,
) -> None:
    backbone, cfg = student_from_checkpoint(checkpoint)
    partners = cfg.ablation.hr_optical and "rgb" in open_store(store).array_keys()
    dataset = PretrainDataset(store, table, with_rgb=partners)
    picks = np.linspace(0, len(dataset) - 1, n_samples).round().astype(int).tolist()
    batch = torch.utils.data.default_collate(dataset.__getitems__(picks))
    multicrop = MultiCrop(
        partners=partners, band_stats=read_stats(store), normalisation=cfg.crops.normalisation
    )
    size = (batch["s2"].shape[-1] // 16) * 16  # the VFM needs whole 16-pixel patches
    # the whole tile as the model's normalised input, unaugmented (deo.data.model_input)
    ms = multicrop.whole(batch["s2"], batch.get("rgb"), batch.get("has_rgb"), size)
    rgb = ms[:, :3]

    shown = rgb * multicrop.std[:3] + multicrop.mean[:3]  # back to the max-scaled [0, 1]
    columns = {"input (optical channels)": shown.permute(0, 2, 3, 1).clamp(0, 1).numpy()}
    columns["student, MS path"] = pca_rgb(backbone(ms, "ms").patch_mid)
    if cfg.ablation.optical_path:
        columns["student, RGB path"] = pca_rgb(backbone(rgb, "rgb").patch_mid)
    vfm = VFMTeacher(teacher)(rgb, normalised=True)
    grid_tokens = vfm.patch_mid.transpose(1, 2).unflatten(2, vfm.grid)
    label = "VFM teacher (random tiny ViT)" if teacher.tiny else f"VFM teacher ({teacher.arch})"
    columns[label] = pca_rgb(grid_tokens)

    fig, axes = plt.subplots(
        n_samples, len(columns), figsize=(3 * len(columns), 3 * n_samples), squeeze=False
    )
    for j, (title, images) in enumerate(columns.items()):
        for i in range(n_samples):
            axes[i, j].imshow(images[i], interpolation="nearest")
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
        axes[0, j].set_title(title, fontsize="medium")
    fig.suptitle("Patch features, first three principal components as RGB")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
