"""Report figures from the stages' records: training curves, data counts, rule runtimes.

Each function reads the files a stage wrote and saves one PNG; nothing is recomputed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # file output only: no display on cluster nodes

import matplotlib.pyplot as plt
import pandas as pd

LOSS_PARTS = ("loss", "ms_loss", "compression", "expansion", "optical_loss")
OPTICAL_PARTS = ("cls", "patch_final", "patch_mid")


def training_curves(metrics: dict[str, Path], out: Path) -> None:
    """Every loss part, the optical cosines, lr/wd/momentum and throughput per step, per run."""
    frames = {run: pd.read_csv(path) for run, path in metrics.items()}
    panels = [
        ("loss terms", LOSS_PARTS),
        ("optical cosine (higher is closer to the VFM)", OPTICAL_PARTS),
        ("learning rate", ("lr",)),
        ("weight decay / EMA momentum", ("wd", "momentum")),
        ("throughput (images/s)", ("images_per_s",)),
        ("gradient norm", ("grad_norm",)),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    for ax, (title, columns) in zip(axes.flat, panels, strict=True):
        for run, df in frames.items():
            for column in columns:
                if column in df:
                    label = column if len(frames) == 1 else f"{run}: {column}"
                    ax.plot(df["step"], df[column], label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.suptitle("Training: " + ", ".join(frames))
    fig.savefig(out, dpi=100)
    plt.close(fig)


def data_counts(counts: Path, out: Path) -> None:
    """Scenes selected → stored, partners expected → stored, and rejects by reason."""
    c = json.loads(counts.read_text())
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(14, 5), constrained_layout=True, gridspec_kw={"width_ratios": [1, 2]}
    )
    keys = ("scenes_selected", "scenes_stored", "partners_expected", "partners_stored")
    names, values = [k.replace("_", " ") for k in keys], [c[k] for k in keys]
    bars = left.bar(names, values, color=["#4c72b0", "#55a868", "#8172b2", "#64b5cd"])
    left.bar_label(bars)
    left.tick_params(axis="x", rotation=20)
    left.set_title("Pre-training store")
    reasons = sorted(c["rejects_by_reason"].items(), key=lambda kv: kv[1])
    right.barh([r for r, _ in reasons], [n for _, n in reasons], color="#c44e52")
    right.set_title(f"Rejects by reason ({sum(n for _, n in reasons)} in all)")
    right.set_xlabel("inputs")
    fig.savefig(out, dpi=100)
    plt.close(fig)


def rule_runtimes(benchmarks: Sequence[Path], out: Path) -> None:
    """Wall time and peak memory of every job, from Snakemake's ``benchmark:`` files."""
    rows = []
    for path in benchmarks:
        df = pd.read_csv(path, sep="\t")
        rows.append({"job": path.stem, "s": df["s"].mean(), "max_rss": df["max_rss"].max()})
    table = pd.DataFrame(rows).sort_values("s")
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(14, 0.35 * len(table) + 1.5), constrained_layout=True, sharey=True
    )
    left.barh(table["job"], table["s"], color="#4c72b0")
    left.set_xlabel("wall time (s)")
    right.barh(table["job"], pd.to_numeric(table["max_rss"], errors="coerce"), color="#dd8452")
    right.set_xlabel("peak RSS (MB)")
    fig.suptitle(f"Per-job runtimes ({table['s'].sum():.0f} s of jobs in all)")
    fig.savefig(out, dpi=100)
    plt.close(fig)
