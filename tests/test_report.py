"""Report figures: PCA colouring against an independent computation, and each plot's file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from deo.report.features import pca_rgb
from deo.report.plots import (
    coreg_scores,
    data_counts,
    rule_runtimes,
    runtime_table,
    training_curves,
)


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
    rule_runtimes({"a": [tmp_path / "a.tsv"], "b": [tmp_path / "b.tsv"]}, tmp_path / "r.png")
    scores = {"coreg_score": [0.9, 0.8, 0.1, np.nan, -0.2], "has_rgb": [1, 1, 0, 0, 0]}
    pd.DataFrame(scores).astype({"has_rgb": bool}).to_parquet(tmp_path / "s.parquet")
    coreg_scores(tmp_path / "s.parquet", 0.3, tmp_path / "s.png")
    for name in ("t", "c", "r", "s"):
        with Image.open(tmp_path / f"{name}.png") as image:
            assert image.size[0] > 500 and np.asarray(image).std() > 0


def test_runtimes_are_summed_per_rule(tmp_path: Path) -> None:
    header = "s\th:m:s\tmax_rss\tmax_vms\n"
    records = {"h0": (2.0, "120.5"), "h1": (3.5, "NA"), "h2": (1.0, "80.0"), "m": (4.0, "NA")}
    for name, (seconds, rss) in records.items():
        (tmp_path / f"{name}.tsv").write_text(
            f"{header}{seconds}\t0:00:0{int(seconds)}\t{rss}\t1\n"
        )
    # a record holding several repeats (benchmark: repeat()) counts their mean
    (tmp_path / "r.tsv").write_text(f"{header}1.0\t0:00:01\t10\t1\n3.0\t0:00:03\t30\t1\n")
    jobs = {
        "harmonise": [tmp_path / f"h{i}.tsv" for i in range(3)],
        "merge": [tmp_path / "m.tsv"],
        "repeat": [tmp_path / "r.tsv"],
    }
    table = runtime_table(jobs).set_index("rule")
    assert table.loc["harmonise", "jobs"] == 3
    assert table.loc["harmonise", "s"] == pytest.approx(2.0 + 3.5 + 1.0)
    assert table.loc["harmonise", "longest"] == pytest.approx(3.5)
    assert table.loc["harmonise", "max_rss"] == pytest.approx(120.5)
    assert np.isnan(table.loc["merge", "max_rss"]) and table.loc["merge", "s"] == 4.0
    assert table.loc["repeat", "s"] == pytest.approx(2.0) and table.loc["repeat", "max_rss"] == 30
    assert list(table.index) == ["repeat", "merge", "harmonise"]  # ascending total time


def test_plot_command_names_an_argument_without_its_name(tmp_path: Path) -> None:
    from deo.cli import main

    metrics = tmp_path / "m.csv"
    for kind, form in (("training", "RUN=metrics.csv"), ("runtimes", "RULE=benchmark.tsv")):
        with pytest.raises(SystemExit, match=f"deo plot {kind}: '{metrics}' is not {form}"):
            main(["plot", kind, str(metrics), "--out", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()
