"""Semantic segmentation: UPerNet on the four stage maps, scored by mIoU (PANGAEA-style)."""

from __future__ import annotations

from collections.abc import Mapping

from torch.utils.data import Dataset

from deo.errors import ConfigError
from deo.evaluation.encoders import FeatureEncoder
from deo.evaluation.metrics import ConfusionMatrix
from deo.evaluation.protocols.common import seeded
from deo.evaluation.protocols.dense import DenseConfig, DenseModel, fit_dense
from deo.evaluation.protocols.temporal import TemporalConfig, temporal_modules


def run_segmentation(
    encoder: FeatureEncoder,
    datasets: Mapping[str, Dataset],
    num_classes: int,
    cfg: DenseConfig,
    seed: int,
    temporal: TemporalConfig | None = None,
) -> dict[str, float]:
    """mIoU on val (best epoch) and test of a UPerNet trained on ``{"image", "mask"}`` samples.

    Time-series samples (``image`` of shape ``(T, C, H, W)``) are merged over time per stage
    by ``temporal``'s learned aggregation. Returns ``val``, ``test`` and ``epoch``
    (see ``fit_dense``).
    """
    series = datasets["train"][0]["image"].ndim == 4
    if series and (temporal is None or temporal.aggregation == "median"):
        raise ConfigError("time-series samples need a learned temporal aggregation (ltae|linear)")
    with seeded(seed, cfg.device):
        merge = temporal_modules(temporal, encoder.stage_dims) if series and temporal else None
        model = DenseModel(encoder, num_classes, cfg, temporal=merge)
    return fit_dense(model, datasets, ("image",), num_classes, ConfusionMatrix.miou, cfg, seed)
