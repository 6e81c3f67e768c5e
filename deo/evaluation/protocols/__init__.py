"""Evaluation protocols: which head is trained on the encoder's features, per kind of task.

- ``classification`` / ``multilabel``: linear probe (+ k-NN) on pooled features (``linear``);
- ``segmentation``: UPerNet on the four stage maps (``segmentation``); a time series is
  encoded date by date and merged over time per stage first (``temporal``);
- ``change``: the same UPerNet on per-stage |difference| of two dates (``change``).

Each protocol returns a ``dict[str, float]`` whose ``val`` and ``test`` keys hold the task's
metric (as a fraction) on the validation split used for selection and on the test split.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

from torch.utils.data import Dataset

from deo.errors import ConfigError
from deo.evaluation.encoders import FeatureEncoder, LoadedEncoder
from deo.evaluation.protocols.change import run_change
from deo.evaluation.protocols.dense import DenseConfig
from deo.evaluation.protocols.linear import LinearConfig, run_linear
from deo.evaluation.protocols.segmentation import run_segmentation
from deo.evaluation.protocols.temporal import TemporalConfig
from deo.models.student import Modality

Task = Literal["classification", "multilabel", "segmentation", "change"]

# The metric each task's protocol reports under ``val``/``test``, named as in the paper's table.
TASK_METRIC: dict[str, str] = {
    "classification": "top1",
    "multilabel": "F1",
    "segmentation": "mIoU",
    "change": "F1",
}
# The protocol's name as written in the results files.
TASK_PROTOCOL: dict[str, str] = {
    "classification": "linear",
    "multilabel": "linear",
    "segmentation": "upernet",
    "change": "upernet-siamese-diff",
}


@dataclass(frozen=True)
class ProtocolConfig:
    """The ``evaluate.protocol`` config section: one protocol config per kind of head."""

    linear: LinearConfig = field(default_factory=LinearConfig)
    segmentation: DenseConfig = field(default_factory=DenseConfig)
    change: DenseConfig = field(default_factory=DenseConfig)
    temporal: TemporalConfig = field(default_factory=TemporalConfig)


def run_protocol(
    task: str,
    encoder: LoadedEncoder,
    modality: Modality,
    datasets: Mapping[str, Dataset],
    num_classes: int,
    cfg: ProtocolConfig,
    seed: int,
) -> dict[str, float]:
    """Run the protocol of ``task`` with ``encoder``'s ``modality`` path; its metrics."""
    if task in ("classification", "multilabel"):
        frozen = FeatureEncoder(encoder, modality)
        return run_linear(frozen, datasets, task, num_classes, cfg.linear, seed)
    if task == "segmentation":
        features = FeatureEncoder(encoder, modality, trainable=cfg.segmentation.finetune)
        return run_segmentation(
            features, datasets, num_classes, cfg.segmentation, seed, cfg.temporal
        )
    if task == "change":
        features = FeatureEncoder(encoder, modality, trainable=cfg.change.finetune)
        return run_change(features, datasets, cfg.change, seed)
    raise ConfigError(f"unknown task {task!r}; expected one of {list(get_args(Task))}")


__all__ = [
    "TASK_METRIC",
    "TASK_PROTOCOL",
    "DenseConfig",
    "LinearConfig",
    "ProtocolConfig",
    "Task",
    "TemporalConfig",
    "run_protocol",
]
