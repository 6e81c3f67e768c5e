"""One evaluation job: one benchmark, one encoder, one seed -> one results CSV.

The CSV's first columns are the results contract (``RESULT_COLUMNS``): benchmark, task,
metric, value, split, seed, model, checkpoint_digest. ``value`` is in percent, the scale of
the paper's tables. One row per split the protocol reports (``val``, the split the learning
rate or epoch was selected on, and ``test``); multi-label benchmarks add ``F1_macro`` rows.
Extra columns follow (``EXTRA_COLUMNS``): the protocol, the job's status, the k-NN figure of
linear probes, what was selected, the model channels the benchmark lacks, the benchmark's
group and modality, a reason where the status is not ``ok``, the model path the inputs took
(``embedding``: an optical benchmark goes through ``ms`` for a model without an optical path)
and how they were normalised (``model`` statistics or the ``benchmark``'s own).

Before the protocol runs, a few test samples are checked for degenerate inputs (a channel
nearly constant, optical values far from the product's declared scale); each finding is
logged as a warning naming the benchmark and the channel, and kept in the JSON.

A job whose benchmark data cannot be found still writes its CSV, with status ``missing``, NaN
values and the reason, so the summary can mark it instead of silently dropping the benchmark.
A JSON beside the CSV records the resolved protocol config, every metric the protocol
returned and the run time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
from torch.utils.data import Dataset

from deo.errors import ConfigError, DataError
from deo.evaluation.encoders import LoadedEncoder
from deo.evaluation.inputs import ModelInput, input_warnings
from deo.evaluation.protocols import TASK_METRIC, TASK_PROTOCOL, ProtocolConfig, run_protocol
from deo.evaluation.protocols.common import SPLITS

log = logging.getLogger(__name__)

RESULT_COLUMNS: tuple[str, ...] = (
    "benchmark",
    "task",
    "metric",
    "value",
    "split",
    "seed",
    "model",
    "checkpoint_digest",
)
EXTRA_COLUMNS: tuple[str, ...] = (
    "protocol",
    "status",
    "knn_value",
    "selected",
    "missing_bands",
    "group",
    "modality",
    "reason",
    "embedding",
    "normalisation",
)
CHECKED_SAMPLES = 4
"""Test samples inspected for degenerate inputs before a job runs."""
REPORTED_SPLITS: tuple[str, ...] = ("val", "test")


class Benchmark(Protocol):
    """What a job needs of a benchmark spec (``deo.evaluation.registry.BenchmarkSpec``)."""

    name: str
    group: str
    task: str
    metric: str
    modality: Any
    num_classes: int

    def make(self, root: Path, split: str, **kwargs: Any) -> Dataset: ...


@dataclass(frozen=True)
class ResultRow:
    """One line of a results CSV; field order is the column order."""

    benchmark: str
    task: str
    metric: str
    value: float
    split: str
    seed: int
    model: str
    checkpoint_digest: str
    protocol: str
    status: str = "ok"
    knn_value: float = math.nan
    selected: str = ""
    missing_bands: str = ""
    group: str = ""
    modality: str = ""
    reason: str = ""
    embedding: str = ""
    normalisation: str = ""


def evaluate(
    spec: Benchmark,
    datasets: Mapping[str, Dataset],
    encoder: LoadedEncoder,
    protocol_cfg: ProtocolConfig,
    seed: int,
) -> list[ResultRow]:
    """Run the benchmark's protocol with ``encoder`` on ``datasets`` (train/val/test)."""
    return _evaluate(spec, datasets, encoder, protocol_cfg, seed)[0]


def run_job(
    spec: Benchmark,
    root: Path,
    encoder: LoadedEncoder,
    protocol_cfg: ProtocolConfig,
    seed: int,
    out: Path,
    model_input: ModelInput | None = None,
    **make_kwargs: Any,
) -> list[ResultRow]:
    """Read the benchmark's splits from ``root``, evaluate, write ``out`` (CSV) and its JSON.

    ``model_input`` says how the model wants its input (default: no input spec known, so the
    benchmark's statistics, through the optical path when the encoder has one). A benchmark
    whose data cannot be opened (not found, not downloadable, unreadable) gives a ``missing``
    CSV; a failure after the data opened is a bug or a bad sample and propagates.
    """
    started = time.perf_counter()
    if model_input is None:
        model_input = ModelInput(optical_path="rgb" in encoder.modalities)
    if getattr(spec, "temporal", False):
        make_kwargs.setdefault("dates", protocol_cfg.temporal.reader_dates)
    warnings: list[str] = []
    try:
        datasets = {
            split: spec.make(root, split, model_input=model_input, **make_kwargs)
            for split in SPLITS
        }
    except (DataError, FileNotFoundError) as err:
        log.warning("%s: data missing, recording the job as missing: %s", spec.name, err)
        rows = missing_rows(spec, encoder, seed, reason=str(err))
        metrics: dict[str, float] = {}
    else:
        warnings = check_inputs(spec.name, datasets["test"])
        rows, metrics = _evaluate(spec, datasets, encoder, protocol_cfg, seed)
    write_results(rows, out)
    provenance = {
        "benchmark": spec.name,
        "model": encoder.name,
        "kind": encoder.kind,
        "checkpoint_digest": encoder.digest,
        "seed": seed,
        "status": rows[0].status,
        "metrics": metrics,
        "input_warnings": warnings,
        "input_spec": dataclasses.asdict(model_input.spec) if model_input.spec else None,
        "protocol": dataclasses.asdict(protocol_cfg),
        "seconds": round(time.perf_counter() - started, 3),
    }
    _atomic_write(out.with_suffix(".json"), json.dumps(provenance, indent=2, default=str))
    return rows


def check_inputs(name: str, dataset: Dataset, samples: int = CHECKED_SAMPLES) -> list[str]:
    """Warnings about degenerate model inputs in the first ``samples`` of ``dataset``."""
    mapping = getattr(dataset, "mapping", None)
    if mapping is None:
        return []
    count = min(samples, len(dataset))  # type: ignore[arg-type]
    samples = [dataset[i] for i in range(count)]
    images = [sample[key] for sample in samples for key in ("image", "image1") if key in sample]
    problems = input_warnings(name, mapping, images)
    for problem in problems:
        log.warning("degenerate input: %s", problem)
    return problems


def missing_rows(
    spec: Benchmark, encoder: LoadedEncoder, seed: int, reason: str
) -> list[ResultRow]:
    """The rows of a job that could not run for lack of data: NaN values, the reason kept."""
    return [
        _row(spec, encoder, seed, split, math.nan, status="missing", reason=reason)
        for split in REPORTED_SPLITS
    ]


def write_results(rows: Sequence[ResultRow], path: Path) -> None:
    """Write ``rows`` as CSV (contract columns first), atomically."""
    if not rows:
        raise ValueError(f"{path}: no result rows to write")
    frame = pd.DataFrame([dataclasses.asdict(r) for r in rows], columns=_columns())
    _atomic_write(Path(path), frame.to_csv(index=False))


def read_results(path: Path) -> pd.DataFrame:
    """A results CSV, checked for the contract columns."""
    frame = pd.read_csv(path, keep_default_na=False, na_values=["", "nan", "NaN"])
    absent = [c for c in RESULT_COLUMNS if c not in frame.columns]
    if absent:
        raise ConfigError(f"{path}: not a results file (no column(s) {absent})")
    return frame


def _evaluate(
    spec: Benchmark,
    datasets: Mapping[str, Dataset],
    encoder: LoadedEncoder,
    protocol_cfg: ProtocolConfig,
    seed: int,
) -> tuple[list[ResultRow], dict[str, float]]:
    expected = TASK_METRIC.get(spec.task)
    if expected is None or expected.lower() != spec.metric.lower():
        raise ConfigError(
            f"benchmark {spec.name}: task {spec.task!r} reports {expected!r}, "
            f"but the spec names metric {spec.metric!r}"
        )
    log.info("%s: %s with %s, seed %d", spec.name, TASK_PROTOCOL[spec.task], encoder.name, seed)
    embedding = getattr(datasets["test"], "embedding", spec.modality)
    if embedding != spec.modality:
        log.info(
            "%s: %s has no %s path; the inputs go through its MS embedding",
            spec.name,
            encoder.name,
            spec.modality,
        )
    metrics = run_protocol(
        spec.task, encoder, embedding, datasets, spec.num_classes, protocol_cfg, seed
    )
    selected = f"lr={metrics['lr']:g}" if "lr" in metrics else f"epoch={int(metrics['epoch'])}"
    missing = ";".join(getattr(datasets["test"], "missing_bands", ()))
    mapping = getattr(datasets["test"], "mapping", None)
    normalisation = ""
    if mapping is not None:
        normalisation = "model" if mapping.model.uses_spec else "benchmark"
    rows = []
    for split in REPORTED_SPLITS:
        common = {
            "selected": selected,
            "missing_bands": missing,
            "embedding": str(embedding),
            "normalisation": normalisation,
        }
        knn = 100 * metrics.get(f"knn_{split}", math.nan)
        rows.append(_row(spec, encoder, seed, split, 100 * metrics[split], knn_value=knn, **common))
        if f"{split}_macro" in metrics:
            macro = 100 * metrics[f"{split}_macro"]
            rows.append(_row(spec, encoder, seed, split, macro, metric="F1_macro", **common))
    for row in rows:
        log.info("%s %s %s: %.2f", row.benchmark, row.metric, row.split, row.value)
    return rows, metrics


def _row(
    spec: Benchmark,
    encoder: LoadedEncoder,
    seed: int,
    split: str,
    value: float,
    metric: str | None = None,
    **extra: Any,
) -> ResultRow:
    return ResultRow(
        benchmark=spec.name,
        task=spec.task,
        metric=metric or spec.metric,
        value=value,
        split=split,
        seed=seed,
        model=encoder.name,
        checkpoint_digest=encoder.digest,
        protocol=TASK_PROTOCOL.get(spec.task, ""),
        group=spec.group,
        modality=str(spec.modality),
        **extra,
    )


def _columns() -> list[str]:
    names = [f.name for f in dataclasses.fields(ResultRow)]
    assert tuple(names) == RESULT_COLUMNS + EXTRA_COLUMNS, names
    return names


def _atomic_write(path: Path, text: str) -> None:
    """Write via a temporary file and rename: a killed job never leaves half a results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
