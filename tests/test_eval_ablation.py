"""The ablation: its table (averages computed by hand here), the results figure, a model
without an optical path scored on an optical benchmark, and the paper DAG's dry run."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_eval_inputs import write_geobench_rgb

from deo.evaluation.datasets import GeoBenchClassification
from deo.evaluation.encoders import load_encoder
from deo.evaluation.protocols import LinearConfig, ProtocolConfig
from deo.evaluation.registry import BenchmarkSpec
from deo.evaluation.run import ResultRow, read_results, run_job, write_results
from deo.evaluation.stage import parse_job
from deo.evaluation.summarise import ablation_markdown, ablation_table, collect_jobs
from deo.models.student import StudentConfig
from deo.report.results import plot_results

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).parents[1]
# benchmark -> modality
MODALITY = {"A": "rgb", "B": "ms", "C": "ms"}
# (benchmark, run) -> test value for seeds 0 and 1; "mid" has no result on C
VALUES = {
    ("A", "base"): (60.0, 62.0),
    ("B", "base"): (40.0, 40.0),
    ("C", "base"): (70.0, 72.0),
    ("A", "mid"): (66.0, 66.0),
    ("B", "mid"): (44.0, 46.0),
    ("A", "deo"): (70.0, 74.0),
    ("B", "deo"): (50.0, 50.0),
    ("C", "deo"): (80.0, 80.0),
}
PAPER = pd.DataFrame(
    [("Base", 77.0, 60.0, 68.5), ("+ middle", 79.0, 62.0, 70.5), ("DEO", 82.0, 63.5, 72.75)],
    columns=["row", "optical_avg", "ms_avg", "overall_avg"],
)


def _write(root: Path, benchmark: str, run: str, seed: int) -> Path:
    path = root / benchmark / run / f"seed{seed}.csv"
    task, metric = "segmentation", "mIoU"
    value = VALUES[(benchmark, run)][seed]
    rows = [
        ResultRow(benchmark, task, metric, v, split, seed, run, "ab", protocol="upernet",
                  modality=MODALITY[benchmark])
        for split, v in (("val", value - 1), ("test", value))
    ]  # fmt: skip
    write_results(rows, path)
    return path


@pytest.fixture()
def table(tmp_path: Path) -> pd.DataFrame:
    expected = [(b, r, s) for b in MODALITY for r in ("base", "mid", "deo") for s in (0, 1)]
    csvs = [_write(tmp_path, b, r, s) for b, r, s in expected if (b, r) in VALUES]
    return ablation_table(collect_jobs(expected, csvs), ["base", "mid", "deo"], PAPER)


def test_ablation_averages_per_modality_and_differences_between_rows(
    table: pd.DataFrame,
) -> None:
    base, mid, deo = (table.iloc[i] for i in range(3))
    # base: A mean 61; B 40, C 71 -> MS 55.5; overall (61 + 40 + 71) / 3 = 57.333…
    assert base["optical_avg"] == pytest.approx(61.0)
    assert base["ms_avg"] == pytest.approx(55.5)
    assert base["overall_avg"] == pytest.approx(172.0 / 3)
    assert math.isnan(base["d_optical"])
    # mid lacks C: its MS and overall averages are incomplete, not computed over fewer.
    assert mid["optical_avg"] == pytest.approx(66.0) and mid["d_optical"] == pytest.approx(5.0)
    assert math.isnan(mid["ms_avg"]) and mid["ms_n"] == "1/2" and math.isnan(mid["overall_avg"])
    # deo: A 72; B 50, C 80 -> 65; overall 202 / 3
    assert deo["optical_avg"] == pytest.approx(72.0) and deo["d_optical"] == pytest.approx(6.0)
    assert deo["ms_avg"] == pytest.approx(65.0)
    assert deo["overall_avg"] == pytest.approx(202.0 / 3)
    # The paper's rows stand beside ours, their differences computed the same way.
    assert list(table["paper_row"]) == ["Base", "+ middle", "DEO"]
    assert deo["paper_d_ms"] == pytest.approx(1.5)
    text = ablation_markdown(table)
    assert "| mid | 66.00 (+5.00) | incomplete (1/2) |" in text and "72.00 (+6.00)" in text


def test_results_figure_with_and_without_ablation(table: pd.DataFrame, tmp_path: Path) -> None:
    summary = pd.DataFrame(
        {
            "benchmark": ["A", "B", "average: overall"],
            "deo_mean": [72.0, math.nan, 72.0],
            "deo_std": [2.0, math.nan, math.nan],
            "random_mean": [30.0, 20.0, 25.0],
            "random_std": [1.0, 1.0, 1.0],
            "paper_DEO": [80.0, 50.0, 65.0],
        }
    )
    summary.to_csv(tmp_path / "summary.csv", index=False)
    table.to_csv(tmp_path / "ablation.csv", index=False)
    plot_results(
        tmp_path / "summary.csv", tmp_path / "ablation.csv", ["deo", "random"], tmp_path / "r.png"
    )
    plot_results(tmp_path / "summary.csv", None, ["deo"], tmp_path / "s.png")
    for name in ("r.png", "s.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(Exception, match="nope"):
        plot_results(tmp_path / "summary.csv", None, ["nope"], tmp_path / "x.png")


def test_model_without_optical_path_scores_an_optical_benchmark_through_ms(
    tmp_path: Path,
) -> None:
    root = write_geobench_rgb(tmp_path / "rgb", "uint8", "classification", n=6)
    spec = BenchmarkSpec(
        "fake-rgb", "classification", "classification", "top1", "rgb", 2,
        GeoBenchClassification, {"task_name": "fake", "modality": "rgb"},
    )  # fmt: skip
    tiny = StudentConfig(
        arch="swin_t", window_size=4, img_size=32, embed_dim=16,
        depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), drop_path_rate=0.0,
    )  # fmt: skip
    floor = load_encoder("random", name="base", config=tiny, seed=0)
    ms_only = dataclasses.replace(floor, modalities=frozenset({"ms"}))
    cfg = ProtocolConfig(linear=LinearConfig(epochs=2, batch_size=4, lrs=(0.01,), knn_k=1))
    out = tmp_path / "out.csv"
    run_job(spec, root, ms_only, cfg, 0, out)
    rows = read_results(out)
    assert set(rows["status"]) == {"ok"} and set(rows["embedding"]) == {"ms"}
    assert rows["value"].between(0, 100).all()


def test_paper_dag_schedules_every_ablation_row_without_a_doomed_job(tmp_path: Path) -> None:
    """Snakemake's own dry run of config/paper.yaml (about 20 s: the DAG has ~500 jobs)."""
    for item in ("Snakefile", "workflow", "config", "envs"):
        source = ROOT / item
        copy = shutil.copytree if source.is_dir() else shutil.copy
        copy(source, tmp_path / item)
    paper = yaml.safe_load((ROOT / "config/paper.yaml").read_text())
    weights = tmp_path / paper["teacher"]["weights"]  # licence-gated: an empty stand-in
    weights.parent.mkdir(parents=True, exist_ok=True)
    weights.touch()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "snakemake", "-n", "-p", "--cores", "1"]
    done = subprocess.run(
        [*cmd, "--configfile", "config/paper.yaml"],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = [parse_job(j) for j in re.findall(r"deo evaluate --job '([^']+)'", done.stdout)]
    scheduled = {(j.benchmark, j.model, j.seed) for j in jobs}
    ablation = paper["evaluate"]["ablation"]
    assert ablation["runs"] == [
        "base",
        "vfm_cls",
        "optical_path",
        "vfm_patches",
        "optical_aug",
        "deo",
    ]
    for run in ablation["runs"]:
        for benchmark in ablation["benchmarks"]:
            for seed in paper["evaluate"]["seeds"]:
                assert (benchmark, run, seed) in scheduled
    deo = {b for b, m, _ in scheduled if m == "deo"}
    assert deo == set(paper["evaluate"]["benchmarks"]) and len(deo) == 13
    # The runs without an optical path (train.runs ablation.optical_path false) take optical
    # benchmarks through their MS embedding: every job of theirs is the same kind of job.
    assert all(
        j.spec.kind == "student" and j.normalisation == "model" for j in jobs if j.model == "base"
    )
    assert "results/ablation.csv" in done.stdout and "results/report/results.png" in done.stdout
