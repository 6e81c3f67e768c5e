"""Linear probe and k-NN on the frozen encoder's pooled features (scene classification).

The encoder runs once per split: features are extracted, then every probe trains on the
cached matrix, which makes the learning-rate sweep nearly free. Features are standardised
with the *train* split's mean and std (a linear layer trained with one learning rate for
all benchmarks behaves alike only on standardised inputs). Each learning rate of the grid
trains a fresh head for the same fixed number of epochs from the same initialisation; the one
with the best validation metric is reported on test. k-NN (cosine similarity on L2-normalised
features, DINO's temperature-weighted vote) is a second, training-free figure.

Single-label tasks use cross-entropy and top-1; multi-label tasks binary cross-entropy and
sigmoid > 0.5, scored by micro F1 (macro F1 as a secondary figure; see ``metrics``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from deo.evaluation.encoders import FeatureEncoder
from deo.evaluation.metrics import ConfusionMatrix, MultilabelCounts
from deo.evaluation.protocols.common import (
    SPLITS,
    best_index,
    check_splits,
    make_loader,
    seeded,
)

log = logging.getLogger(__name__)

LabelKind = Literal["classification", "multilabel"]


@dataclass(frozen=True)
class LinearConfig:
    """The linear-probe protocol; the learning rate is chosen from ``lrs`` on validation."""

    epochs: int = 100
    batch_size: int = 256
    lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
    weight_decay: float = 0.0
    # Resize images to this side before the encoder (None: native size). Small benchmark
    # chips (32-120 px) leave a Swin's last stage only a few tokens wide.
    image_size: int | None = None
    knn_k: int = 20
    knn_temperature: float = 0.07
    extract_batch_size: int = 64
    device: str = "cpu"
    workers: int = 0


def run_linear(
    encoder: FeatureEncoder,
    datasets: Mapping[str, Dataset],
    task: LabelKind,
    num_classes: int,
    cfg: LinearConfig,
    seed: int,
) -> dict[str, float]:
    """Metrics of the best-on-val linear probe and of k-NN.

    Keys: ``val``/``test`` (the task's metric of the selected probe), ``lr`` (the selected
    rate), ``knn_val``/``knn_test``; multi-label tasks add ``val_macro``/``test_macro``.
    """
    check_splits(datasets)
    with seeded(seed, cfg.device):
        feats = {s: extract_features(encoder, datasets[s], cfg) for s in SPLITS}
        mean = feats["train"][0].mean(0)
        std = feats["train"][0].std(0).clamp(min=1e-6)
        x = {s: (f - mean) / std for s, (f, _) in feats.items()}
        y = {s: labels for s, (_, labels) in feats.items()}

        heads, scores = [], []
        for lr in cfg.lrs:
            heads.append(_train_head(x["train"], y["train"], task, num_classes, lr, cfg, seed))
            scores.append(_score(heads[-1](x["val"]), y["val"], task, num_classes))
            log.info("linear probe lr %g: val %.4f", lr, scores[-1][0])
        best = best_index([main for main, _ in scores])
        lr, head, (val, val_macro) = cfg.lrs[best], heads[best], scores[best]
        test, test_macro = _score(head(x["test"]), y["test"], task, num_classes)

        bank = F.normalize(feats["train"][0], dim=1)
        knn = {}
        for split in ("val", "test"):
            queries = F.normalize(feats[split][0], dim=1)
            predictions = _knn_predict(bank, y["train"], queries, task, num_classes, cfg)
            knn[split] = _score_predictions(predictions, y[split], task, num_classes)[0]
    out = {"val": val, "test": test, "lr": lr, "knn_val": knn["val"], "knn_test": knn["test"]}
    if task == "multilabel":
        out |= {"val_macro": val_macro, "test_macro": test_macro}
    return out


@torch.inference_mode()
def extract_features(
    encoder: FeatureEncoder, dataset: Dataset, cfg: LinearConfig
) -> tuple[Tensor, Tensor]:
    """(pooled features (N, D), labels) of a whole split, in dataset order, on the CPU."""
    encoder.eval().to(cfg.device)
    feats, labels = [], []
    for batch in make_loader(dataset, cfg.extract_batch_size, workers=cfg.workers):
        image = batch["image"].to(cfg.device)
        if cfg.image_size is not None:
            image = F.interpolate(
                image, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False
            )
        feats.append(encoder(image).pooled.float().cpu())
        labels.append(batch["label"])
    return torch.cat(feats), torch.cat(labels)


def _train_head(
    x: Tensor, y: Tensor, task: LabelKind, num_classes: int, lr: float, cfg: LinearConfig, seed: int
) -> nn.Linear:
    """A linear layer trained for ``cfg.epochs`` (AdamW, cosine decay) on cached features.

    Initialisation and batch order depend on ``seed`` only, so every rate of the sweep starts
    from the same weights and sees the same batches.
    """
    with seeded(seed):
        head = nn.Linear(x.shape[1], num_classes)
    order = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.epochs * steps_per_epoch)
    for _ in range(cfg.epochs):
        for index in torch.randperm(len(x), generator=order).split(cfg.batch_size):
            logits = head(x[index])
            if task == "multilabel":
                loss = F.binary_cross_entropy_with_logits(logits, y[index].float())
            else:
                loss = F.cross_entropy(logits, y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return head.eval().requires_grad_(False)


def _score(logits: Tensor, y: Tensor, task: LabelKind, num_classes: int) -> tuple[float, float]:
    """(main metric, macro F1 or NaN) of a head's logits."""
    predictions = (logits.sigmoid() > 0.5).float() if task == "multilabel" else logits.argmax(1)
    return _score_predictions(predictions, y, task, num_classes)


def _score_predictions(
    predictions: Tensor, y: Tensor, task: LabelKind, num_classes: int
) -> tuple[float, float]:
    """Top-1 (single-label) or (micro F1, macro F1) (multi-label) of hard predictions."""
    if task == "multilabel":
        counts = MultilabelCounts(num_classes)
        counts.update(predictions, y)
        return counts.f1_micro(), counts.f1_macro()
    matrix = ConfusionMatrix(num_classes)
    matrix.update(predictions, y)
    return matrix.accuracy(), math.nan


def _knn_predict(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    task: LabelKind,
    num_classes: int,
    cfg: LinearConfig,
    chunk: int = 1024,
) -> Tensor:
    """Hard predictions by a temperature-weighted vote of the k most cosine-similar train samples.

    Multi-label votes average the neighbours' multi-hot vectors with the same weights and keep
    the labels above one half.
    """
    k = min(cfg.knn_k, len(bank))
    targets = (
        bank_labels.float() if task == "multilabel" else F.one_hot(bank_labels, num_classes).float()
    )
    out = []
    for start in range(0, len(queries), chunk):
        similarity, index = (queries[start : start + chunk] @ bank.T).topk(k, dim=1)
        weights = (similarity / cfg.knn_temperature).exp()
        votes = (weights[..., None] * targets[index]).sum(1)
        if task == "multilabel":
            out.append((votes / weights.sum(1, keepdim=True) > 0.5).float())
        else:
            out.append(votes.argmax(1))
    return torch.cat(out)
