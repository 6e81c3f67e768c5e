"""The summary table: join, mean ± std over seeds, missing jobs kept, averages computed."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from deo.evaluation.run import RESULT_COLUMNS, ResultRow, missing_rows, write_results
from deo.evaluation.summarise import collect_jobs, read_paper, summarise, to_markdown, write_summary

# benchmark -> (group, modality, task, metric)
BENCHMARKS = {
    "A": ("optical_segmentation", "rgb", "segmentation", "mIoU"),
    "B": ("ms_segmentation", "ms", "segmentation", "mIoU"),
    "C": ("classification", "ms", "classification", "top1"),
}
# (benchmark, model) -> test value per seed 0, 1
VALUES = {
    ("A", "deo"): (81.0, 83.0),
    ("B", "deo"): (49.0, 51.0),
    ("C", "deo"): (90.0, 92.0),
    ("A", "random"): (40.0, 44.0),
    ("B", "random"): (20.0, 22.0),
}
PAPER = pd.DataFrame(
    [
        ("A", "optical_segmentation", "mIoU", "DINOv3-B (RGB)", 75.0),
        ("A", "optical_segmentation", "mIoU", "Copernicus-FM (MS)", 70.0),
        ("A", "optical_segmentation", "mIoU", "TerraFM (MS)", 72.0),
        ("A", "optical_segmentation", "mIoU", "DEO", 80.0),
        ("B", "ms_segmentation", "mIoU", "TerraFM (MS)", 45.0),
        ("B", "ms_segmentation", "mIoU", "DEO", 50.0),
        ("C", "classification", "top1", "DINOv3-B", 88.0),
        ("C", "classification", "top1", "DEO", 90.0),
        ("Z", "classification", "top1", "DEO", 10.0),  # not evaluated: not in the table
    ],
    columns=["benchmark", "group", "metric", "model", "value"],
)


class Spec:
    def __init__(self, name: str) -> None:
        self.name = name
        self.group, self.modality, self.task, self.metric = BENCHMARKS[name]


class Encoder:
    def __init__(self, name: str) -> None:
        self.name = name
        self.digest = "random" if name == "random" else "ab" * 32


def write_job(root: Path, benchmark: str, model: str, seed: int) -> Path:
    """The CSV a job writes: val and test rows, or ``missing`` rows without data."""
    group, modality, task, metric = BENCHMARKS[benchmark]
    path = root / benchmark / model / f"seed{seed}.csv"
    if (benchmark, model) not in VALUES:
        write_results(missing_rows(Spec(benchmark), Encoder(model), seed, "not found"), path)
        return path
    test = VALUES[(benchmark, model)][seed]
    rows = [
        ResultRow(benchmark, task, metric, value, split, seed, model, Encoder(model).digest,
                  protocol="p", group=group, modality=modality)
        for split, value in (("val", test - 5), ("test", test))
    ]  # fmt: skip
    write_results(rows, path)
    return path


@pytest.fixture()
def jobs(tmp_path: Path):
    expected = [(b, m, s) for b in BENCHMARKS for m in ("deo", "random") for s in (0, 1)]
    csvs = [write_job(tmp_path, b, m, s) for b, m, s in expected]
    return collect_jobs(expected, csvs)


def row(table: pd.DataFrame, benchmark: str) -> pd.Series:
    return table[table["benchmark"] == benchmark].iloc[0]


def test_results_csv_starts_with_the_contract_columns(tmp_path: Path) -> None:
    frame = pd.read_csv(write_job(tmp_path, "A", "deo", 0))
    assert tuple(frame.columns[: len(RESULT_COLUMNS)]) == RESULT_COLUMNS
    assert RESULT_COLUMNS[-1] == "checkpoint_digest"


def test_join_mean_std_and_paper_columns(jobs) -> None:
    table = summarise(jobs, PAPER, reference_model="deo")
    assert list(table["benchmark"][:3]) == ["A", "B", "C"]
    a = row(table, "A")
    assert a["deo_mean"] == 82.0 and a["deo_std"] == pytest.approx(math.sqrt(2))
    assert a["deo"] == "82.00 ± 1.41" and a["deo_n"] == 2
    assert a["random_mean"] == 42.0
    assert (a["paper_DEO"], a["paper_DINOv3"]) == (80.0, 75.0)
    assert (a["paper_best_prior"], a["paper_best_prior_model"]) == (72.0, "TerraFM (MS)")
    assert a["diff_vs_paper_DEO"] == pytest.approx(2.0)
    assert (a["group"], a["modality"], a["metric"]) == ("optical_segmentation", "rgb", "mIoU")
    assert math.isnan(row(table, "B")["paper_DINOv3"])


def test_missing_jobs_are_marked_not_dropped(jobs) -> None:
    statuses = {(j.benchmark, j.model, j.seed): j.status for j in jobs}
    assert statuses[("C", "random", 0)] == "missing" and statuses[("C", "deo", 0)] == "ok"
    c = row(summarise(jobs, PAPER, reference_model="deo"), "C")
    assert c["random"] == "missing" and math.isnan(c["random_mean"])
    assert c["deo"] == "91.00 ± 1.41"


def test_absent_results_file_is_a_failed_job(tmp_path: Path) -> None:
    expected = [("A", "deo", 0), ("B", "deo", 0)]
    collected = collect_jobs(expected, [write_job(tmp_path, "A", "deo", 0)])
    assert [j.status for j in collected] == ["ok", "failed"]
    b = row(summarise(collected, PAPER, reference_model="deo"), "B")
    assert b["deo"] == "failed"


def test_averages_are_computed_per_group_modality_and_overall(jobs) -> None:
    table = summarise(jobs, PAPER, reference_model="deo")
    labels = list(table["benchmark"][3:])
    assert labels == [
        "average: optical_segmentation",
        "average: ms_segmentation",
        "average: classification",
        "average: optical",
        "average: MS",
        "average: overall",
    ]
    ms = row(table, "average: MS")
    assert ms["deo_mean"] == pytest.approx((50 + 91) / 2)
    # per-seed averages 69.5 and 71.5
    assert ms["deo_std"] == pytest.approx(math.sqrt(2))
    assert ms["random"] == "incomplete (1/2)" and math.isnan(ms["random_mean"])
    overall = row(table, "average: overall")
    assert overall["deo_mean"] == pytest.approx((82 + 50 + 91) / 3)
    assert overall["paper_DEO"] == pytest.approx((80 + 50 + 90) / 3)
    assert overall["diff_vs_paper_DEO"] == pytest.approx(1.0)
    assert math.isnan(overall["paper_DINOv3"])  # B has no DINOv3 figure
    assert row(table, "average: optical")["random_mean"] == pytest.approx(42.0)


def test_markdown_and_files(jobs, tmp_path: Path) -> None:
    table = summarise(jobs, PAPER, reference_model="deo")
    markdown = to_markdown(table, ["deo", "random"])
    lines = markdown.splitlines()
    assert lines[0].startswith("| benchmark | metric | deo | random | paper DEO")
    assert (
        "| A | mIoU | 82.00 ± 1.41 | 42.00 ± 2.83 | 80.00 | 75.00 | 72.00 (TerraFM (MS))"
        in lines[2]
    )
    assert "| C | top1 | 91.00 ± 1.41 | missing |" in markdown
    assert len(lines) == 2 + len(table)
    paper_csv = tmp_path / "paper.csv"
    PAPER.to_csv(paper_csv, index=False)
    pd.testing.assert_frame_equal(read_paper(paper_csv), PAPER)
    write_summary(table, ["deo", "random"], tmp_path / "summary.csv", tmp_path / "summary.md")
    assert pd.read_csv(tmp_path / "summary.csv")["benchmark"].tolist() == list(table["benchmark"])
    assert (tmp_path / "summary.md").read_text() == markdown
