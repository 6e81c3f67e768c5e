"""The downstream benchmarks of the paper, and the small synthetic ones of the embedded default.

Each entry names its reader class and the arguments that make it read this benchmark; the
evaluation stage only ever calls ``get_benchmark(name).make(root, split)``. Names are those of
``config/paper_results.csv``. Class counts follow each benchmark's own definition (GEO-Bench's
task specifications, PASTIS without its void class, binary change / flood / building masks).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from deo.errors import ConfigError
from deo.evaluation.datasets import (
    LEVIRCD,
    OSCD,
    PASTIS,
    BenchmarkDataset,
    GeoBenchClassification,
    GeoBenchSegmentation,
    Sen1Floods11,
    SpaceNet1,
)
from deo.evaluation.datasets.base import Task
from deo.evaluation.inputs import Modality, ModelInput

Group = Literal["optical_segmentation", "ms_segmentation", "change_detection", "classification"]
Metric = Literal["top1", "F1", "mIoU"]


@dataclass(frozen=True)
class BenchmarkSpec:
    """What the evaluation needs to know about one benchmark, and how to read it."""

    name: str
    group: Group
    task: Task
    metric: Metric
    modality: Modality
    num_classes: int
    dataset: type[BenchmarkDataset]
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    """Constructor arguments of ``dataset`` that select this benchmark (e.g. a GEO-Bench task)."""
    temporal: bool = False
    """Whether the reader can yield time series (``dates``) for a multi-temporal protocol."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    def make(
        self, root: Path | str, split: str, *, model_input: ModelInput | None = None, **kw: Any
    ) -> BenchmarkDataset:
        """The ``split`` of this benchmark read from ``root``, its own data folder.

        ``kw`` go to the reader (``partition``, ``download``, …) and override ``options``;
        ``model_input`` maps its samples for the evaluated model (default: none known).
        """
        dataset = self.dataset(Path(root), split=split, **{**self.options, **kw})
        if model_input is not None:
            dataset.mapping = dataset.mapping.for_model(model_input)
        if (dataset.task, dataset.modality) != (self.task, self.modality):
            raise ConfigError(
                f"{self.name}: reader yields {dataset.task}/{dataset.modality} samples, "
                f"the registry says {self.task}/{self.modality}"
            )
        return dataset


def _geobench(
    name: str,
    group: Group,
    task: Task,
    metric: Metric,
    modality: Modality,
    num_classes: int,
) -> BenchmarkSpec:
    reader = GeoBenchSegmentation if task == "segmentation" else GeoBenchClassification
    options: dict[str, Any] = {"task_name": name, "modality": modality}
    if task == "multilabel":
        options["multilabel"] = True
    return BenchmarkSpec(name, group, task, metric, modality, num_classes, reader, options)


def _by_name(*specs: BenchmarkSpec) -> dict[str, BenchmarkSpec]:
    return {spec.name: spec for spec in specs}


BENCHMARKS: dict[str, BenchmarkSpec] = _by_name(
    BenchmarkSpec("SpaceNet1", "optical_segmentation", "segmentation", "mIoU", "rgb", 2, SpaceNet1),
    _geobench("m-nz-cattle", "optical_segmentation", "segmentation", "mIoU", "rgb", 2),
    _geobench("m-pv4ger-seg", "optical_segmentation", "segmentation", "mIoU", "rgb", 2),
    _geobench("m-chesapeake-landcover", "optical_segmentation", "segmentation", "mIoU", "rgb", 7),
    _geobench("m-SA-crop-type", "ms_segmentation", "segmentation", "mIoU", "ms", 10),
    _geobench("m-cashew-plant", "ms_segmentation", "segmentation", "mIoU", "ms", 7),
    BenchmarkSpec("Sen1Floods11", "ms_segmentation", "segmentation", "mIoU", "ms", 2, Sen1Floods11),
    BenchmarkSpec(
        "PASTIS", "ms_segmentation", "segmentation", "mIoU", "ms", 19, PASTIS, temporal=True
    ),
    BenchmarkSpec("LEVIR-CD", "change_detection", "change", "F1", "rgb", 2, LEVIRCD),
    BenchmarkSpec("OSCD", "change_detection", "change", "F1", "ms", 2, OSCD),
    _geobench("m-bigearthnet", "classification", "multilabel", "F1", "ms", 43),
    _geobench("m-so2sat", "classification", "classification", "top1", "ms", 17),
    _geobench("m-eurosat", "classification", "classification", "top1", "ms", 10),
)
"""The paper's downstream benchmarks, by the names of ``config/paper_results.csv``."""

DEMO_BENCHMARKS: dict[str, BenchmarkSpec] = _by_name(
    _geobench("demo-classification", "classification", "classification", "top1", "ms", 4),
    _geobench("demo-segmentation", "ms_segmentation", "segmentation", "mIoU", "ms", 4),
    BenchmarkSpec("demo-change", "change_detection", "change", "F1", "rgb", 2, LEVIRCD),
)
"""Small synthetic benchmarks in GEO-Bench's and LEVIR-CD's formats, written by
``deo.evaluation.synthetic.write_demo_benchmarks`` and read by the same readers."""


def get_benchmark(name: str) -> BenchmarkSpec:
    """The spec of benchmark ``name`` (paper or demo); ConfigError listing the known names."""
    spec = BENCHMARKS.get(name) or DEMO_BENCHMARKS.get(name)
    if spec is None:
        known = ", ".join([*BENCHMARKS, *DEMO_BENCHMARKS])
        raise ConfigError(f"unknown benchmark {name!r}; known benchmarks: {known}")
    return spec
