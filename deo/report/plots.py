"""Report figures from the stages' records: training curves, data counts, co-registration
scores, rule runtimes.

Each function reads the files a stage wrote and saves one PNG; nothing is recomputed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # file output only: no display on cluster nodes

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

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
    right.xaxis.set_major_locator(MaxNLocator(integer=True))  # counts, not fractions
    fig.savefig(out, dpi=100)
    plt.close(fig)


def coreg_scores(table: Path, min_score: float, out: Path) -> None:
    """Histogram of the partners' co-registration scores, kept and rejected, with the threshold.

    Reads the store's table (``coreg_score``, ``has_rgb``); scenes without a partner have no
    score, partners too small or flat to score are counted in the title.
    """
    df = pd.read_parquet(table, columns=["coreg_score", "has_rgb"])
    scored = df[df["coreg_score"].notna()]
    kept = scored.loc[scored["has_rgb"], "coreg_score"]
    dropped = scored.loc[~scored["has_rgb"], "coreg_score"]
    fig, ax = plt.subplots(figsize=(9, 5), constrained_layout=True)
    bins = np.linspace(-1, 1, 41)
    ax.hist(
        [kept, dropped],
        bins=bins,
        stacked=True,
        color=["#55a868", "#c44e52"],
        label=[f"kept as partner ({len(kept)})", f"rejected, scene kept MS-only ({len(dropped)})"],
    )
    ax.axvline(min_score, color="black", linestyle="--", label=f"coreg_min_score = {min_score:g}")
    ax.legend(loc="upper left")
    ax.set_xlabel("co-registration score (Pearson r of local luminance detail)")
    ax.set_ylabel("scenes")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    unscored = int(df["coreg_score"].isna().sum())
    ax.set_title(
        f"Aerial partners vs Sentinel-2: {len(scored)} scored; "
        f"{unscored} scenes without a partner or too little overlap to score"
    )
    fig.savefig(out, dpi=100)
    plt.close(fig)


def runtime_table(benchmarks: dict[str, Sequence[Path]]) -> pd.DataFrame:
    """Per rule: jobs, summed and longest wall time (s), largest peak RSS (MB; NaN if unknown)."""
    rows = []
    for rule, paths in benchmarks.items():
        jobs = [pd.read_csv(path, sep="\t") for path in paths]
        seconds = [float(df["s"].mean()) for df in jobs]
        rss = pd.to_numeric(pd.concat([df["max_rss"] for df in jobs]), errors="coerce")
        rows.append(
            {
                "rule": rule,
                "jobs": len(jobs),
                "s": sum(seconds),
                "longest": max(seconds),
                "max_rss": rss.max(),
            }
        )
    return pd.DataFrame(rows).sort_values("s", ignore_index=True)


def rule_runtimes(benchmarks: dict[str, Sequence[Path]], out: Path) -> None:
    """Wall time and peak memory per rule, from Snakemake's ``benchmark:`` files.

    One bar per rule, not per job: at the paper's scale harmonise and evaluate run hundreds of
    jobs. The bar is the rule's summed wall time, the dot its longest job.
    """
    table = runtime_table(benchmarks)
    labels = [
        r if n == 1 else f"{r} ×{n}" for r, n in zip(table["rule"], table["jobs"], strict=True)
    ]
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(14, 0.35 * len(table) + 1.5), constrained_layout=True, sharey=True
    )
    left.barh(labels, table["s"], color="#4c72b0", label="all jobs")
    left.plot(table["longest"], labels, "o", color="#222222", label="longest job")
    left.set_xlabel("wall time (s)")
    left.legend(loc="lower right")
    right.barh(labels, table["max_rss"], color="#dd8452")
    right.set_xlabel("peak RSS of any job (MB)")
    fig.suptitle(
        f"Runtime per rule ({table['jobs'].sum()} jobs, {table['s'].sum():.0f} s of jobs in all)"
    )
    fig.savefig(out, dpi=100)
    plt.close(fig)
