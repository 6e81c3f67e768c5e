"""Downstream metrics, accumulated over batches and computed once at the end.

Every metric is computed from counts (a confusion matrix, or per-label TP/FP/FN), never by
averaging per-batch scores: per-batch averages weight small batches and images wrongly.
Values are fractions in [0, 1]; the results files scale them to percent like the paper.

Conventions, chosen to match the evaluation suites the paper's numbers come from:

- **Ignore index**: target pixels equal to ``ignore_index`` (255) are left out of every count,
  whatever is predicted there.
- **mIoU** (segmentation, PANGAEA-like): IoU_c = TP / (TP + FP + FN), averaged over the classes
  *present in the ground truth or in the prediction* (TP + FP + FN > 0). A class that appears in
  neither is undefined rather than perfect or zero, so it neither inflates nor deflates the mean.
- **F1 of a class** (binary change detection reports the change class, 1):
  2 TP / (2 TP + FP + FN); NaN when the class is absent from both ground truth and prediction.
- **Top-1** (single-label classification): the fraction of samples whose arg-max is the label,
  i.e. the trace of the confusion matrix over its total (overall accuracy).
- **Multi-label F1** (m-bigearthnet): predictions are sigmoid(logit) > 0.5. The *micro* F1 pools
  TP/FP/FN over all labels and is the figure reported: GEO-Bench scores multi-label tasks with
  torchmetrics' ``F1Score`` at its default ``average="micro"``. The *macro* F1 (the mean of
  per-label F1 over labels present in ground truth or prediction) is a secondary figure.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

IGNORE_INDEX = 255


class ConfusionMatrix:
    """Counts ``matrix[target, prediction]`` over any number of updates.

    Works for pixels (segmentation, change) and for samples (classification) alike: both are
    a flat list of (target, prediction) pairs once the ignored ones are dropped.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, prediction: Tensor, target: Tensor) -> None:
        """Add integer class maps or vectors of the same shape."""
        if prediction.shape != target.shape:
            raise ValueError(
                f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ"
            )
        prediction = prediction.reshape(-1).long().cpu()
        target = target.reshape(-1).long().cpu()
        keep = target != self.ignore_index
        prediction, target = prediction[keep], target[keep]
        k = self.num_classes
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= k):
            raise ValueError(f"target labels outside 0..{k - 1} that are not {self.ignore_index}")
        if prediction.numel() and (int(prediction.min()) < 0 or int(prediction.max()) >= k):
            raise ValueError(f"prediction holds labels outside 0..{k - 1}")
        self.matrix += torch.bincount(target * k + prediction, minlength=k * k).reshape(k, k)

    def _counts(self) -> tuple[Tensor, Tensor, Tensor]:
        m = self.matrix.double()
        tp = m.diagonal()
        return tp, m.sum(0) - tp, m.sum(1) - tp  # TP, FP (predicted c, not c), FN

    def iou(self) -> Tensor:
        """Per-class IoU; NaN for a class absent from both ground truth and prediction."""
        tp, fp, fn = self._counts()
        union = tp + fp + fn
        return torch.where(union > 0, tp / union.clamp(min=1), torch.nan)

    def miou(self) -> float:
        """Mean IoU over the classes present in ground truth or prediction (NaN if none)."""
        iou = self.iou()
        present = ~iou.isnan()
        return float(iou[present].mean()) if bool(present.any()) else math.nan

    def f1(self, cls: int) -> float:
        """F1 of class ``cls``; NaN when it is absent from both ground truth and prediction."""
        tp, fp, fn = (c[cls].item() for c in self._counts())
        denominator = 2 * tp + fp + fn
        return 2 * tp / denominator if denominator > 0 else math.nan

    def accuracy(self) -> float:
        """Fraction of counted pairs on the diagonal: top-1 for classification (NaN if none)."""
        total = int(self.matrix.sum())
        return int(self.matrix.trace()) / total if total else math.nan


class MultilabelCounts:
    """Per-label TP/FP/FN of thresholded multi-label predictions, over any number of updates."""

    def __init__(self, num_labels: int) -> None:
        self.num_labels = num_labels
        self.tp = torch.zeros(num_labels, dtype=torch.int64)
        self.fp = torch.zeros(num_labels, dtype=torch.int64)
        self.fn = torch.zeros(num_labels, dtype=torch.int64)

    def update(self, prediction: Tensor, target: Tensor) -> None:
        """Add (N, K) predictions and multi-hot targets (anything > 0.5 counts as positive)."""
        if prediction.shape != target.shape or prediction.ndim != 2:
            raise ValueError(
                f"expected two (N, {self.num_labels}) tensors, got {tuple(prediction.shape)} "
                f"and {tuple(target.shape)}"
            )
        pred = prediction.cpu() > 0.5
        true = target.cpu() > 0.5
        self.tp += (pred & true).sum(0)
        self.fp += (pred & ~true).sum(0)
        self.fn += (~pred & true).sum(0)

    def f1_micro(self) -> float:
        """F1 of the pooled counts; NaN when nothing is positive in targets or predictions."""
        tp, fp, fn = int(self.tp.sum()), int(self.fp.sum()), int(self.fn.sum())
        denominator = 2 * tp + fp + fn
        return 2 * tp / denominator if denominator else math.nan

    def f1_macro(self) -> float:
        """Mean per-label F1 over labels present in ground truth or prediction (NaN if none)."""
        denominator = (2 * self.tp + self.fp + self.fn).double()
        present = denominator > 0
        if not bool(present.any()):
            return math.nan
        return float((2 * self.tp.double()[present] / denominator[present]).mean())
