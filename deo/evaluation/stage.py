"""The evaluation stages as functions over paths: what ``deo prepare-benchmark``,
``deo evaluate`` and ``deo summarise`` do for one Snakemake job each."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from deo.config import from_dict
from deo.errors import ConfigError, DataError
from deo.evaluation.encoders import LoadedEncoder, load_encoder
from deo.evaluation.inputs import ModelInput
from deo.evaluation.protocols import ProtocolConfig
from deo.evaluation.registry import get_benchmark
from deo.evaluation.run import read_results, run_job
from deo.evaluation.summarise import (
    ablation_markdown,
    ablation_table,
    collect_jobs,
    read_paper,
    read_paper_ablation,
    summarise,
    write_summary,
)
from deo.evaluation.synthetic import write_demo_benchmarks
from deo.models.export import load_backbone
from deo.models.input_spec import RELEASED_DEO, InputSpec

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
INPUT_SPEC_FILE = "input_spec.json"
"""The input spec `deo export` writes beside the weights."""
RELEASED = "released"


@dataclass(frozen=True)
class ModelSpec:
    """One compared encoder: a trained run's export, the random floor, or an external file."""

    kind: str  # "student" | "random" | "torchvision"
    path: str | None = None  # weights file; for "random", a backbone whose architecture to copy
    bands: tuple[str, ...] | None = None  # an external checkpoint's input bands, in order
    # The model's input spec: a JSON file, "released" (torchgeo's DEO), or None: the one
    # `deo export` wrote beside the weights (for "random": beside the copied backbone).
    input_spec: str | None = None


@dataclass(frozen=True)
class EvaluateJob:
    benchmark: str
    model: str
    spec: ModelSpec
    seed: int
    partition: str = "default"
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    normalisation: str = "model"  # "model": the model's input spec; "benchmark": its own stats


def write_demo(root: Path, seed: int) -> None:
    folders = write_demo_benchmarks(root, seed)
    log.info("demo benchmarks written: %s", {k: str(v) for k, v in folders.items()})


def prepare(name: str, root: Path, download: bool, record: Path) -> None:
    """Make the benchmark's data ready once (download, extract, band statistics), so the
    evaluation jobs that follow read it concurrently without racing to set it up."""
    spec = get_benchmark(name)
    sizes = {split: len(spec.make(root, split, download=download)) for split in SPLITS}
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"benchmark": name, "root": str(root), "samples": sizes}))
    log.info("%s ready at %s: %s", name, root, sizes)


def load_model(name: str, spec: ModelSpec, seed: int) -> LoadedEncoder:
    if spec.kind == "random":
        if spec.path is None:
            raise ConfigError(f"model {name!r}: the random floor needs a backbone to copy")
        _, cfg = load_backbone(Path(spec.path))
        return load_encoder("random", name=name, config=cfg, seed=seed)
    if spec.path is None:
        raise ConfigError(f"model {name!r} ({spec.kind}) needs a weights path")
    return load_encoder(spec.kind, name=name, path=spec.path, checkpoint_bands=spec.bands)


def input_spec(name: str, spec: ModelSpec, encoder: LoadedEncoder) -> InputSpec | None:
    """The model's input spec: named in its config, carried by the loader, or exported beside
    its weights; None when there is none (the benchmark's statistics are then used)."""
    if spec.input_spec == RELEASED:
        return RELEASED_DEO
    path = Path(spec.input_spec) if spec.input_spec else None
    if path is None:
        carried = getattr(encoder, "input_spec", None)
        if carried is not None:
            return carried
        if spec.path is not None and spec.kind in ("student", "random"):
            folder = Path(spec.path) if Path(spec.path).is_dir() else Path(spec.path).parent
            path = folder / INPUT_SPEC_FILE
            if not path.is_file():
                return None
        else:
            return None
    return InputSpec.read(path)  # a ConfigError naming the file when it is not a spec


def model_input(job: EvaluateJob, encoder: LoadedEncoder) -> ModelInput:
    """How ``job``'s model takes its input, from its spec and ``evaluate.normalisation``."""
    spec = input_spec(job.model, job.spec, encoder)
    if spec is None and job.normalisation == "model":
        log.warning(
            "model %s has no input spec: each benchmark is normalised with its own statistics",
            job.model,
        )
    return ModelInput(spec, job.normalisation, optical_path="rgb" in encoder.modalities)  # type: ignore[arg-type]


def evaluate(job: EvaluateJob, root: Path, out: Path) -> None:
    """Run one (benchmark, model, seed) job; missing data fails it with how to get the data."""
    spec = get_benchmark(job.benchmark)
    encoder = load_model(job.model, job.spec, job.seed)
    inputs = model_input(job, encoder)
    run_job(spec, root, encoder, job.protocol, job.seed, out, inputs, partition=job.partition)
    results = read_results(out)
    missing = results[results["status"] == "missing"]
    if len(missing):
        out.unlink()
        raise DataError(root, f"{job.benchmark}: {missing['reason'].iloc[0]}")
    test = results[(results["split"] == "test") & (results["metric"] == spec.metric)]
    values = test["value"].tolist()
    log.info(
        "%s / %s / seed %d: test %s = %s", job.benchmark, job.model, job.seed, spec.metric, values
    )


def parse_job(text: str) -> EvaluateJob:
    return from_dict(EvaluateJob, json.loads(text), "evaluate job")


def _jobs(
    expected: Sequence[tuple[str, str, int]], csvs: Sequence[Path], unavailable: Sequence[str]
) -> list:
    """Every expected job's record; failed jobs of benchmarks without data are "missing"."""
    return [
        replace(job, status="missing", reason="benchmark data not available")
        if job.benchmark in unavailable and job.status == "failed"
        else job
        for job in collect_jobs(expected, csvs)
    ]


def summarise_results(
    expected: Sequence[tuple[str, str, int]],
    csvs: Sequence[Path],
    paper: Path,
    reference: str,
    out_csv: Path,
    out_md: Path,
    out_html: Path,
    unavailable: Sequence[str] = (),
) -> None:
    """The results table: every expected job; those of benchmarks without data are missing."""
    jobs = _jobs(expected, csvs, unavailable)
    table = summarise(jobs, read_paper(paper), reference)
    models = list(dict.fromkeys(model for _, model, _ in expected))
    write_summary(table, models, out_csv, out_md)
    shown = [c for c in table.columns if not c.endswith(("_mean", "_std", "_n"))]
    html = table[shown].to_html(index=False, na_rep="", border=0, classes="deo-summary")
    out_html.write_text(f"<html><body><h3>Downstream results</h3>{html}</body></html>")
    log.info("summary of %d jobs for %d models", len(jobs), len(models))


def ablation_results(
    expected: Sequence[tuple[str, str, int]],
    csvs: Sequence[Path],
    runs: Sequence[str],
    paper: Path,
    out_csv: Path,
    out_md: Path,
    out_html: Path,
    unavailable: Sequence[str] = (),
) -> None:
    """The ablation table: one row per run of ``runs``, averages beside the paper's rows."""
    jobs = _jobs(expected, csvs, unavailable)
    table = ablation_table(jobs, runs, read_paper_ablation(paper))
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_csv, index=False, float_format="%.4f")
    out_md.write_text(ablation_markdown(table))
    html = table.to_html(index=False, na_rep="", border=0, float_format="%.2f")
    out_html.write_text(f"<html><body><h3>Ablation</h3>{html}</body></html>")
    log.info("ablation table of %d runs from %d jobs", len(runs), len(jobs))
