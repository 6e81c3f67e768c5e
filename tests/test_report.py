"""Report figures: PCA colouring against an independent computation, and each plot's file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from deo.report.features import pca_rgb
from deo.report.plots import data_counts, rule_runtimes, training_curves


def test_pca_rgb_follows_the_principal_axes() -> None:
    g = torch.Generator().manual_seed(0)
    # tokens vary most along feature 0, then 1, then 2: the maps must follow those features
    scales = torch.tensor([10.0, 5.0, 2.0, 0.01, 0.01])
    feats = torch.randn(3, 5, 4, 4, generator=g) * scales[None, :, None, None]
    rgb = pca_rgb(feats, low=0, high=100)
    assert rgb.shape == (3, 4, 4, 3) and rgb.min() >= 0 and rgb.max() <= 1
    for channel in range(3):
        x = feats[:, channel].flatten().numpy()
        y = rgb[..., channel].flatten()
        assert abs(np.corrcoef(x, y)[0, 1]) > 0.95


def test_plots_write_images(tmp_path: Path) -> None:
    metrics = tmp_path / "m.csv"
    steps = np.arange(1, 6)
    pd.DataFrame(
        {"step": steps, "loss": -steps, "compression": steps / 10, "cls": steps / 5, "lr": 1e-3}
    ).to_csv(metrics, index=False)
    training_curves({"deo": metrics}, tmp_path / "t.png")
    counts = {
        "scenes_selected": 10,
        "scenes_stored": 8,
        "partners_expected": 6,
        "partners_stored": 5,
        "rejects_by_reason": {"unreadable JSON": 1, "corrupt or truncated JPEG": 2},
    }
    (tmp_path / "c.json").write_text(json.dumps(counts))
    data_counts(tmp_path / "c.json", tmp_path / "c.png")
    (tmp_path / "a.tsv").write_text("s\th:m:s\tmax_rss\n1.5\t0:00:01\t100.0\n")
    (tmp_path / "b.tsv").write_text("s\th:m:s\tmax_rss\n0.5\t0:00:00\tNA\n")
    rule_runtimes([tmp_path / "a.tsv", tmp_path / "b.tsv"], tmp_path / "r.png")
    for name in ("t", "c", "r"):
        with Image.open(tmp_path / f"{name}.png") as image:
            assert image.size[0] > 500 and np.asarray(image).std() > 0
