"""Join the per-job results CSVs into one table beside the paper's published numbers.

Rows are benchmarks, in the paper's order (then any others), followed by averages; columns
are the evaluated models — mean ± std over seeds of the test metric — then the paper's DEO,
DINOv3 and best prior figures and the difference of the reference model (ours) from the
paper's DEO.

Every expected job appears: a benchmark whose jobs found no data is marked ``missing`` (and
one whose jobs failed otherwise ``failed``) rather than dropped, so a short table cannot pass
for a complete one.

Averages are computed here, never copied (the paper's printed averages do not all match its
per-benchmark numbers): one row per benchmark group, per input modality (``optical`` = RGB
benchmarks, ``MS`` = multispectral ones) and ``overall``. A column's average over a set of
benchmarks is given only when that column has a value for every benchmark of the set;
otherwise it is NaN, shown as ``incomplete (k/n)``. A model's average is the mean of its
per-benchmark means, and its ± is the std over seeds of the per-seed averages (seeds present
on every benchmark of the set).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import pandas as pd

from deo.errors import ConfigError
from deo.evaluation.protocols import TASK_METRIC
from deo.evaluation.run import RESULT_COLUMNS, read_results

log = logging.getLogger(__name__)

JobStatus = Literal["ok", "missing", "failed"]
PAPER_COLUMNS: tuple[str, ...] = ("benchmark", "group", "metric", "model", "value")
PAPER_DEO = "DEO"
PAPER_DINOV3_PREFIX = "DINOv3"
SUMMARY_SPLIT = "test"
_MODALITY_SETS: dict[str, str] = {"rgb": "optical", "ms": "MS"}


@dataclass(frozen=True)
class Job:
    """One expected (benchmark, model, seed) evaluation and how it ended."""

    benchmark: str
    model: str
    seed: int
    status: JobStatus
    results: Path | None = None
    reason: str = ""


def collect_jobs(expected: Iterable[tuple[str, str, int]], csvs: Iterable[Path]) -> list[Job]:
    """Pair each expected (benchmark, model, seed) with its results CSV and its status.

    The status is the one the job wrote (``ok`` or ``missing``); an expected job with no CSV
    is ``failed``. A CSV no job expects is ignored with a warning.
    """
    found: dict[tuple[str, str, int], tuple[Path, str, str]] = {}
    for path in csvs:
        frame = read_results(path)
        for (benchmark, model, seed), rows in frame.groupby(["benchmark", "model", "seed"]):
            status = str(rows["status"].iloc[0]) if "status" in rows else "ok"
            reason = _first_text([rows], "reason")
            found[(str(benchmark), str(model), int(seed))] = (Path(path), status, reason)
    jobs = []
    wanted = list(expected)
    for key in wanted:
        if key in found:
            path, status, reason = found[key]
            if status not in ("ok", "missing", "failed"):
                raise ConfigError(f"{path}: unknown job status {status!r}")
            jobs.append(Job(*key, status=cast(JobStatus, status), results=path, reason=reason))
        else:
            jobs.append(Job(*key, status="failed", reason="no results file"))
    for key in sorted(set(found) - set(wanted)):
        log.warning("results for %s found but not expected; left out", key)
    return jobs


def read_paper(path: Path) -> pd.DataFrame:
    """The paper's published figures (``config/paper_results.csv``)."""
    frame = pd.read_csv(path)
    absent = [c for c in PAPER_COLUMNS if c not in frame.columns]
    if absent:
        raise ConfigError(f"{path}: paper results need columns {list(PAPER_COLUMNS)}")
    return frame


def summarise(jobs: Sequence[Job], paper: pd.DataFrame, reference_model: str) -> pd.DataFrame:
    """The summary table: one row per benchmark, then the averages (see the module doc)."""
    if not jobs:
        raise ConfigError("no jobs to summarise")
    models = list(dict.fromkeys(j.model for j in jobs))
    if reference_model not in models:
        raise ConfigError(f"reference model {reference_model!r} is not among {models}")
    written = _job_rows(jobs)
    results = _main_test_values(written, jobs)
    benchmarks = _benchmark_order(jobs, paper)
    info = _benchmark_info(benchmarks, written, paper)

    rows = []
    for benchmark in benchmarks:
        row: dict[str, object] = {"benchmark": benchmark, **info[benchmark]}
        for model in models:
            row |= _model_cells(benchmark, model, jobs, results)
        row |= _paper_cells(paper[paper["benchmark"] == benchmark])
        rows.append(row)
    table = pd.DataFrame(rows)
    table["diff_vs_paper_DEO"] = table[f"{reference_model}_mean"] - table["paper_DEO"]
    averages = [
        _average_row(label, table[mask], models, results, reference_model)
        for label, mask in _average_sets(table)
    ]
    return pd.concat([table, pd.DataFrame(averages)], ignore_index=True)


def to_markdown(table: pd.DataFrame, models: Sequence[str]) -> str:
    """A Markdown rendering: display strings for models, two decimals for the paper's figures."""
    columns = [
        "benchmark",
        "metric",
        *models,
        "paper_DEO",
        "paper_DINOv3",
        "paper_best_prior",
        "diff_vs_paper_DEO",
    ]
    titles = [
        "benchmark",
        "metric",
        *models,
        "paper DEO",
        "paper DINOv3",
        "paper best prior",
        "Δ vs paper DEO",
    ]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for _, row in table.iterrows():
        cells = []
        for column in columns:
            value = row[column]
            prior_model = row["paper_best_prior_model"]
            if column == "paper_best_prior" and isinstance(prior_model, str) and prior_model:
                cells.append(f"{_fmt(value)} ({prior_model})")
            elif column == "diff_vs_paper_DEO":
                cells.append("" if _isnan(value) else f"{value:+.2f}")
            else:
                cells.append(_fmt(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(table: pd.DataFrame, models: Sequence[str], csv: Path, markdown: Path) -> None:
    """Write the summary as CSV and as Markdown."""
    csv.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(csv, index=False, float_format="%.4f")
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(to_markdown(table, models))


def _job_rows(jobs: Sequence[Job]) -> pd.DataFrame:
    """Every row the jobs wrote (ok and missing alike), each CSV filtered to its own job."""
    frames = []
    for job in jobs:
        if job.results is None:
            continue
        frame = read_results(job.results)
        frames.append(
            frame[
                (frame["benchmark"] == job.benchmark)
                & (frame["model"] == job.model)
                & (frame["seed"] == job.seed)
            ]
        )
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    for column in (*RESULT_COLUMNS, "group", "modality"):
        if column not in rows:
            rows[column] = pd.Series(dtype=object)
    if "status" not in rows:
        rows["status"] = "ok"
    return rows


def _main_test_values(rows: pd.DataFrame, jobs: Sequence[Job]) -> pd.DataFrame:
    """One row per ok job: the test value of its task's main metric (not e.g. F1_macro)."""
    expected = rows["task"].map(lambda task: TASK_METRIC.get(str(task), "").lower())
    main = rows["metric"].astype(str).str.lower() == expected
    values = rows[(rows["status"] == "ok") & (rows["split"] == SUMMARY_SPLIT) & main]
    for job in jobs:
        if job.status != "ok":
            continue
        mine = values[
            (values["benchmark"] == job.benchmark)
            & (values["model"] == job.model)
            & (values["seed"] == job.seed)
        ]
        if len(mine) != 1:
            raise ConfigError(
                f"{job.results}: expected one {SUMMARY_SPLIT} row of the main metric for "
                f"{job.benchmark}/{job.model}/seed {job.seed}, found {len(mine)}"
            )
    return values


def _benchmark_order(jobs: Sequence[Job], paper: pd.DataFrame) -> list[str]:
    """Expected benchmarks in the paper's row order, then the others in job order."""
    expected = list(dict.fromkeys(j.benchmark for j in jobs))
    in_paper = [b for b in dict.fromkeys(paper["benchmark"]) if b in expected]
    return in_paper + [b for b in expected if b not in in_paper]


def _benchmark_info(
    benchmarks: Sequence[str], written: pd.DataFrame, paper: pd.DataFrame
) -> dict[str, dict[str, str]]:
    """Group, modality and metric of each benchmark: from its jobs' rows, else the paper's."""
    info = {}
    for benchmark in benchmarks:
        frames = (
            written[written["benchmark"] == benchmark],
            paper[paper["benchmark"] == benchmark],
        )
        info[benchmark] = {c: _first_text(frames, c) for c in ("group", "modality", "metric")}
    return info


def _first_text(frames: Iterable[pd.DataFrame], column: str) -> str:
    """The first non-empty text in ``column`` of the first frame that has one; else ''."""
    for frame in frames:
        if column in frame:
            for value in frame[column]:
                if isinstance(value, str) and value:
                    return value
    return ""


def _model_cells(
    benchmark: str, model: str, jobs: Sequence[Job], results: pd.DataFrame
) -> dict[str, object]:
    """``model`` (display), ``model_mean``, ``model_std``, ``model_n`` of one benchmark."""
    values = results[(results["benchmark"] == benchmark) & (results["model"] == model)]["value"]
    values = values.dropna()
    statuses = {j.status for j in jobs if j.benchmark == benchmark and j.model == model}
    mean, std = _mean_std(list(values))
    if len(values):
        display = _fmt_mean_std(mean, std)
    else:
        display = "missing" if "missing" in statuses else "failed"
    return {model: display, f"{model}_mean": mean, f"{model}_std": std, f"{model}_n": len(values)}


def _paper_cells(rows: pd.DataFrame) -> dict[str, object]:
    """The paper's DEO, DINOv3 and best prior figure for one benchmark (NaN where absent)."""
    deo = rows[rows["model"] == PAPER_DEO]["value"]
    dino = rows[rows["model"].str.startswith(PAPER_DINOV3_PREFIX)]["value"]
    prior = rows[(rows["model"] != PAPER_DEO) & ~rows["model"].str.startswith(PAPER_DINOV3_PREFIX)]
    best = prior.loc[prior["value"].idxmax()] if len(prior) else None
    return {
        "paper_DEO": float(deo.iloc[0]) if len(deo) else math.nan,
        "paper_DINOv3": float(dino.max()) if len(dino) else math.nan,
        "paper_best_prior": float(best["value"]) if best is not None else math.nan,
        "paper_best_prior_model": str(best["model"]) if best is not None else "",
    }


def _average_sets(table: pd.DataFrame) -> list[tuple[str, pd.Series]]:
    """(label, row mask) of each set of benchmarks an average is taken over."""
    sets = [
        (f"average: {group}", table["group"] == group)
        for group in dict.fromkeys(table["group"])
        if group
    ]
    sets += [
        (f"average: {label}", table["modality"] == modality)
        for modality, label in _MODALITY_SETS.items()
        if (table["modality"] == modality).any()
    ]
    sets.append(("average: overall", pd.Series(True, index=table.index)))
    return sets


def _average_row(
    label: str,
    rows: pd.DataFrame,
    models: Sequence[str],
    results: pd.DataFrame,
    reference_model: str,
) -> dict[str, object]:
    """One average row over the benchmarks in ``rows`` (complete columns only)."""
    n = len(rows)
    out: dict[str, object] = {"benchmark": label, "group": "", "modality": "", "metric": ""}
    for model in models:
        means = rows[f"{model}_mean"]
        complete = int(means.notna().sum())
        if complete == n:
            mean = float(means.mean())
            std = _seed_std(results, model, list(rows["benchmark"]))
            out |= {model: _fmt_mean_std(mean, std), f"{model}_mean": mean, f"{model}_std": std}
        else:
            out |= {
                model: f"incomplete ({complete}/{n})",
                f"{model}_mean": math.nan,
                f"{model}_std": math.nan,
            }
    for column in ("paper_DEO", "paper_DINOv3", "paper_best_prior"):
        values = rows[column]
        out[column] = float(values.mean()) if values.notna().all() else math.nan
    out["paper_best_prior_model"] = ""
    out["diff_vs_paper_DEO"] = out[f"{reference_model}_mean"] - out["paper_DEO"]
    return out


def _seed_std(results: pd.DataFrame, model: str, benchmarks: Sequence[str]) -> float:
    """Std over seeds of the per-seed average over ``benchmarks`` (seeds on every one)."""
    mine = results[(results["model"] == model) & results["benchmark"].isin(benchmarks)]
    per_seed = mine.pivot_table(index="seed", columns="benchmark", values="value")
    per_seed = per_seed.reindex(columns=list(benchmarks)).dropna()
    return _mean_std(list(per_seed.mean(axis=1)))[1]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof 1; NaN for fewer than two values); NaN mean when empty."""
    if not values:
        return math.nan, math.nan
    series = pd.Series(values, dtype=float)
    return float(series.mean()), float(series.std(ddof=1)) if len(series) > 1 else math.nan


def _fmt_mean_std(mean: float, std: float) -> str:
    return f"{mean:.2f}" if _isnan(std) else f"{mean:.2f} ± {std:.2f}"


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.2f}"
    return str(value)


def _isnan(value: object) -> bool:
    return isinstance(value, float) and math.isnan(value)


# --------------------------------------------------------------------------- ablation

ABLATION_SETS: tuple[tuple[str, str | None], ...] = (
    ("optical", "rgb"),
    ("ms", "ms"),
    ("overall", None),
)
"""(column prefix, benchmark modality averaged over; None: every benchmark) of the ablation."""
PAPER_ABLATION_COLUMNS: tuple[str, ...] = ("row", "optical_avg", "ms_avg", "overall_avg")


def read_paper_ablation(path: Path) -> pd.DataFrame:
    """The paper's ablation table (``config/paper_ablation.csv``): row label and three averages."""
    frame = pd.read_csv(path)
    absent = [c for c in PAPER_ABLATION_COLUMNS if c not in frame.columns]
    if absent:
        raise ConfigError(
            f"{path}: the paper's ablation needs columns {list(PAPER_ABLATION_COLUMNS)}"
        )
    return frame


def ablation_table(
    jobs: Sequence[Job], runs: Sequence[str], paper: pd.DataFrame | None = None
) -> pd.DataFrame:
    """One row per ablation run, in ``runs`` order: optical, MS and overall averages.

    An average is the mean over the set's benchmarks of each benchmark's mean over seeds (the
    test value of its main metric), given only when the run has a value on every benchmark of
    the set (else NaN, and ``<set>_n`` tells how many it has). ``d_<set>`` is the difference
    from the previous row. When ``paper`` has as many rows as ``runs``, row i is set beside the
    paper's row i (its label, averages and differences); otherwise the paper columns are empty.
    """
    if not runs:
        raise ConfigError("evaluate.ablation.runs is empty")
    mine = [j for j in jobs if j.model in runs]
    written = _job_rows(mine)
    results = _main_test_values(written, mine)
    benchmarks = list(dict.fromkeys(j.benchmark for j in mine))
    modality = {
        b: _first_text([written[written["benchmark"] == b]], "modality") for b in benchmarks
    }
    unknown = [b for b, m in modality.items() if not m]
    if unknown:
        log.warning(
            "ablation: no modality for %s (no results); they count only in overall", unknown
        )
    paired = paper is not None and len(paper) == len(runs)
    if paper is not None and not paired:
        log.warning(
            "ablation: %d runs vs %d rows in the paper's table; not set side by side",
            len(runs),
            len(paper),
        )
    rows: list[dict[str, object]] = []
    for i, run in enumerate(runs):
        per_benchmark = (
            results[results["model"] == run].groupby("benchmark")["value"].mean().to_dict()
        )
        row: dict[str, object] = {"run": run}
        for prefix, wanted in ABLATION_SETS:
            members = [b for b in benchmarks if wanted is None or modality[b] == wanted]
            values = [per_benchmark[b] for b in members if b in per_benchmark]
            complete = bool(members) and len(values) == len(members)
            row[f"{prefix}_avg"] = sum(values) / len(values) if complete else math.nan
            row[f"{prefix}_n"] = f"{len(values)}/{len(members)}"
        if paired:
            assert paper is not None
            source = paper.iloc[i]
            row["paper_row"] = str(source["row"])
            for prefix, _ in ABLATION_SETS:
                row[f"paper_{prefix}_avg"] = float(source[f"{prefix}_avg"])
        rows.append(row)
    table = pd.DataFrame(rows)
    for prefix, _ in ABLATION_SETS:
        table[f"d_{prefix}"] = table[f"{prefix}_avg"].diff()
        if paired:
            table[f"paper_d_{prefix}"] = table[f"paper_{prefix}_avg"].diff()
    return table


def ablation_markdown(table: pd.DataFrame) -> str:
    """The ablation table in Markdown: ours (with Δ to the row above) beside the paper's."""
    paired = "paper_row" in table
    titles = ["run", "optical", "MS", "overall"]
    if paired:
        titles += ["paper row", "paper optical", "paper MS", "paper overall"]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for _, row in table.iterrows():
        cells = [str(row["run"])]
        for prefix, _ in ABLATION_SETS:
            cells.append(_with_delta(row[f"{prefix}_avg"], row[f"d_{prefix}"], row[f"{prefix}_n"]))
        if paired:
            cells.append(str(row["paper_row"]))
            for prefix, _ in ABLATION_SETS:
                cells.append(_with_delta(row[f"paper_{prefix}_avg"], row[f"paper_d_{prefix}"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _with_delta(value: float, delta: float, count: str = "") -> str:
    if _isnan(value):
        return f"incomplete ({count})" if count else ""
    return f"{value:.2f}" if _isnan(delta) else f"{value:.2f} ({delta:+.2f})"
