"""Semantic segmentation: UPerNet on the four stage maps, scored by mIoU (PANGAEA-style)."""

from __future__ import annotations

from collections.abc import Mapping

from torch.utils.data import Dataset

from deo.evaluation.encoders import FeatureEncoder
from deo.evaluation.metrics import ConfusionMatrix
from deo.evaluation.protocols.common import seeded
from deo.evaluation.protocols.dense import DenseConfig, DenseModel, fit_dense


def run_segmentation(
    encoder: FeatureEncoder,
    datasets: Mapping[str, Dataset],
    num_classes: int,
    cfg: DenseConfig,
    seed: int,
) -> dict[str, float]:
    """mIoU on val (best epoch) and test of a UPerNet trained on ``{"image", "mask"}`` samples.

    Returns ``val``, ``test`` and ``epoch`` (see ``fit_dense``).
    """
    with seeded(seed, cfg.device):
        model = DenseModel(encoder, num_classes, cfg)
    return fit_dense(model, datasets, ("image",), num_classes, ConfusionMatrix.miou, cfg, seed)
