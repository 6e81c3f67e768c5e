"""Downstream metrics against confusion matrices worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from deo.evaluation.metrics import IGNORE_INDEX, ConfusionMatrix, MultilabelCounts

# Nine counted pairs and one ignored pixel (whose prediction, 2, must not count anywhere).
TARGET = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, IGNORE_INDEX])
PREDICTION = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0, 1, 2])
# rows = target, columns = prediction
HAND = torch.tensor([[2, 1, 0], [0, 1, 1], [1, 1, 2]])
# TP = (2, 1, 2); FP = column sums - TP = (1, 2, 1); FN = row sums - TP = (1, 1, 2)
HAND_IOU = (2 / 4, 1 / 4, 2 / 5)


def matrix_of(prediction: torch.Tensor, target: torch.Tensor, k: int = 3) -> ConfusionMatrix:
    matrix = ConfusionMatrix(k)
    matrix.update(prediction, target)
    return matrix


def test_confusion_matrix_counts_and_ignores() -> None:
    matrix = matrix_of(PREDICTION, TARGET)
    assert torch.equal(matrix.matrix, HAND)
    assert int(matrix.matrix.sum()) == 9  # the ignored pixel is nowhere


def test_iou_miou_f1_top1_by_hand() -> None:
    matrix = matrix_of(PREDICTION, TARGET)
    assert matrix.iou().tolist() == pytest.approx(HAND_IOU)
    assert matrix.miou() == pytest.approx(sum(HAND_IOU) / 3)  # 0.38333
    assert matrix.f1(2) == pytest.approx(2 * 2 / (2 * 2 + 1 + 2))  # 4/7
    assert matrix.f1(1) == pytest.approx(2 / (2 + 2 + 1))
    assert matrix.accuracy() == pytest.approx(5 / 9)


def test_batches_accumulate_like_one_update() -> None:
    matrix = ConfusionMatrix(3)
    matrix.update(PREDICTION[:4], TARGET[:4])
    matrix.update(PREDICTION[4:], TARGET[4:])
    assert torch.equal(matrix.matrix, HAND)


def test_miou_averages_over_classes_present_in_truth_or_prediction() -> None:
    # A fourth class appears nowhere: undefined, left out of the mean (not 0, not 1).
    matrix = matrix_of(PREDICTION, TARGET, k=4)
    assert math.isnan(matrix.iou()[3])
    assert matrix.miou() == pytest.approx(sum(HAND_IOU) / 3)
    assert math.isnan(matrix.f1(3))
    # A class only ever predicted (a false positive) is present, with IoU 0.
    matrix.update(torch.tensor([3]), torch.tensor([0]))
    assert matrix.iou()[3] == 0
    assert matrix.miou() == pytest.approx((2 / 5 + 1 / 4 + 2 / 5 + 0) / 4)


def test_binary_change_f1() -> None:
    target = torch.tensor([[1, 1, 0], [0, 1, IGNORE_INDEX]])
    prediction = torch.tensor([[1, 0, 0], [1, 1, 1]])
    matrix = matrix_of(prediction, target, k=2)
    # change class: TP 2, FP 1, FN 1 -> F1 = 4 / 6
    assert matrix.f1(1) == pytest.approx(2 / 3)
    assert matrix.miou() == pytest.approx((2 / 4 + 1 / 3) / 2)


def test_top1_of_sample_labels() -> None:
    logits = torch.tensor([[2.0, 0.1, 0.3], [0.1, 0.2, 3.0], [1.0, 0.0, 0.5], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2, 1, 1])
    assert matrix_of(logits.argmax(1), labels).accuracy() == pytest.approx(3 / 4)


def test_multilabel_f1_micro_and_macro() -> None:
    target = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0]], dtype=torch.float32)
    prediction = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 0, 0]], dtype=torch.float32)
    counts = MultilabelCounts(3)
    counts.update(prediction[:1], target[:1])
    counts.update(prediction[1:], target[1:])
    # per label (TP, FP, FN): (2, 0, 0), (1, 0, 1), (0, 1, 1); pooled (3, 1, 2)
    assert counts.f1_micro() == pytest.approx(6 / 9)
    assert counts.f1_macro() == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_multilabel_macro_skips_labels_absent_everywhere() -> None:
    counts = MultilabelCounts(3)
    counts.update(torch.tensor([[1.0, 0, 0]]), torch.tensor([[1.0, 1, 0]]))
    assert counts.f1_macro() == pytest.approx((1 + 0) / 2)
    assert counts.f1_micro() == pytest.approx(2 / 3)


def test_undefined_and_invalid_inputs() -> None:
    empty = ConfusionMatrix(2)
    empty.update(torch.tensor([1]), torch.tensor([IGNORE_INDEX]))
    assert math.isnan(empty.miou()) and math.isnan(empty.accuracy())
    with pytest.raises(ValueError, match="target labels"):
        ConfusionMatrix(2).update(torch.tensor([0]), torch.tensor([5]))
    with pytest.raises(ValueError, match="prediction"):
        ConfusionMatrix(2).update(torch.tensor([3]), torch.tensor([0]))
    with pytest.raises(ValueError, match="differ"):
        ConfusionMatrix(2).update(torch.zeros(2), torch.zeros(3))
