"""The results figure of the report: our benchmarks against the paper's, and the ablation rows.

Read from the tables ``summarise`` and ``ablation`` wrote (``results/summary.csv``,
``results/ablation.csv``); nothing is recomputed. Left: per benchmark, each model's mean test
metric over seeds (± std) as bars, the paper's DEO as a black tick; benchmarks without a value
are labelled "no result" rather than dropped. Right: the ablation's optical, MS and overall
averages per run (solid) beside the paper's rows (dashed) where the two tables pair up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # file output only: no display on cluster nodes

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from deo.errors import ConfigError

ABLATION_SERIES: tuple[tuple[str, str], ...] = (
    ("optical", "optical"),
    ("ms", "MS"),
    ("overall", "overall"),
)


def plot_results(summary: Path, ablation: Path | None, models: Sequence[str], out: Path) -> None:
    """Save the results figure to ``out`` (PNG); the ablation panel only with ``ablation``."""
    table = pd.read_csv(summary)
    absent = [m for m in models if f"{m}_mean" not in table]
    if absent:
        raise ConfigError(f"{summary}: no columns for models {absent}")
    benchmarks = table[~table["benchmark"].astype(str).str.startswith("average")]
    panels = 2 if ablation is not None else 1
    fig, axes = plt.subplots(
        1,
        panels,
        figsize=(max(6.0, 1.1 * len(benchmarks) + 3 * panels), 5),
        constrained_layout=True,
        gridspec_kw={"width_ratios": [max(len(benchmarks), 2), 3][:panels]},
        squeeze=False,
    )
    _benchmark_panel(axes[0, 0], benchmarks, models)
    if ablation is not None:
        _ablation_panel(axes[0, 1], pd.read_csv(ablation))
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _benchmark_panel(ax: plt.Axes, table: pd.DataFrame, models: Sequence[str]) -> None:
    x = np.arange(len(table))
    width = 0.8 / max(len(models), 1)
    for k, model in enumerate(models):
        means = table[f"{model}_mean"].astype(float).to_numpy()
        stds = np.nan_to_num(table[f"{model}_std"].astype(float).to_numpy())
        offset = (k - (len(models) - 1) / 2) * width
        ax.bar(x + offset, np.nan_to_num(means), width, yerr=stds, label=model, capsize=2)
        for xi, mean in zip(x + offset, means, strict=True):
            if math.isnan(mean):
                ax.text(xi, 1, "no result", rotation=90, ha="center", va="bottom", fontsize=7)
    if "paper_DEO" in table:
        paper = table["paper_DEO"].astype(float).to_numpy()
        ax.scatter(x, paper, marker="_", s=400, color="black", zorder=3, label="paper DEO")
    ax.set_xticks(x, table["benchmark"], rotation=45, ha="right")
    ax.set_ylabel("test metric (%)")
    ax.set_title("Benchmarks: ours vs the paper")
    ax.legend(fontsize="small")


def _ablation_panel(ax: plt.Axes, table: pd.DataFrame) -> None:
    x = np.arange(len(table))
    for (prefix, label), colour in zip(ABLATION_SERIES, ("C0", "C1", "C2"), strict=True):
        ax.plot(x, table[f"{prefix}_avg"], "o-", color=colour, label=f"ours: {label}")
        if f"paper_{prefix}_avg" in table:
            ax.plot(x, table[f"paper_{prefix}_avg"], "s--", color=colour, label=f"paper: {label}")
    ax.set_xticks(x, table["run"], rotation=45, ha="right")
    ax.set_ylabel("average test metric (%)")
    ax.set_title("Ablation rows")
    ax.legend(fontsize="small")
