"""Binary change detection: one encoder on both dates, |difference| of each stage into UPerNet.

The shared (Siamese) encoder keeps the comparison about the features the pre-training learnt;
the absolute difference makes the decoder's input symmetric in the two dates. Scored by the F1
of the change class (1), the figure LEVIR-CD and OSCD results are reported in.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch.utils.data import Dataset

from deo.evaluation.encoders import FeatureEncoder
from deo.evaluation.metrics import ConfusionMatrix
from deo.evaluation.protocols.common import seeded
from deo.evaluation.protocols.dense import DenseConfig, DenseModel, fit_dense

CHANGE_CLASS = 1


def change_f1(matrix: ConfusionMatrix) -> float:
    """F1 of the change class."""
    return matrix.f1(CHANGE_CLASS)


def run_change(
    encoder: FeatureEncoder,
    datasets: Mapping[str, Dataset],
    cfg: DenseConfig,
    seed: int,
) -> dict[str, float]:
    """Change-class F1 on val (best epoch) and test, from ``{"image1", "image2", "mask"}``.

    Returns ``val``, ``test`` and ``epoch`` (see ``fit_dense``).
    """
    with seeded(seed, cfg.device):
        model = DenseModel(encoder, 2, cfg, paired=True)
    return fit_dense(model, datasets, ("image1", "image2"), 2, change_f1, cfg, seed)
