"""Dense prediction shared by segmentation and change detection: UPerNet on the stage maps.

PANGAEA's recipe: the four stage maps of the (frozen by default) encoder feed a 512-channel
UPerNet trained with AdamW (lr 1e-4, weight decay 0.05) on random crops, with the learning
rate cut tenfold at 60 % and 90 % of training. After every epoch the validation metric is
computed by sliding-window inference; the best epoch's weights are reported on test.

Change detection differs only in what reaches the decoder: the encoder sees both dates and
the decoder gets, per stage, the absolute difference of the two maps. A time series
(``(B, T, C, H, W)`` images, e.g. PASTIS) is encoded date by date and each stage's maps are
merged over time by a learned module (``temporal``) trained with the decoder.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from deo.errors import ConfigError
from deo.evaluation.encoders import FeatureEncoder
from deo.evaluation.metrics import IGNORE_INDEX, ConfusionMatrix
from deo.evaluation.protocols.common import (
    best_index,
    check_splits,
    make_loader,
    seeded,
    sub_seed,
)
from deo.evaluation.protocols.upernet import UPerNet

log = logging.getLogger(__name__)

# Fractions of training after which the learning rate drops tenfold (PANGAEA's multi-step).
_LR_MILESTONES = (0.6, 0.9)


@dataclass(frozen=True)
class DenseConfig:
    """The UPerNet protocol, for segmentation and change detection alike."""

    epochs: int = 80
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.05
    # Training crop side; larger test tiles are predicted by sliding windows of this side.
    crop_size: int = 256
    # Sliding-window step; None: half a crop (each pixel averaged over up to four windows).
    stride: int | None = None
    channels: int = 512
    pool_scales: tuple[int, ...] = (1, 2, 3, 6)
    finetune: bool = False
    flip: bool = True
    device: str = "cpu"
    workers: int = 0


class DenseModel(nn.Module):
    """Encoder + UPerNet: class logits at the input's size for one image or a pair of dates.

    Inputs are padded (zeros, bottom/right) to a multiple of the encoder's total stride, so
    every stage map is an exact 1/4, 1/8, ... of the padded input; the logits are cropped back.
    """

    def __init__(
        self,
        encoder: FeatureEncoder,
        num_classes: int,
        cfg: DenseConfig,
        paired: bool = False,
        temporal: nn.ModuleList | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.paired = paired
        self.temporal = temporal
        self.decoder = UPerNet(encoder.stage_dims, num_classes, cfg.channels, cfg.pool_scales)

    def forward(self, *images: Tensor) -> Tensor:
        if len(images) != (2 if self.paired else 1):
            raise ValueError(f"expected {2 if self.paired else 1} image(s), got {len(images)}")
        h, w = images[0].shape[-2:]
        stride = self.encoder.stride
        pad = (0, (-w) % stride, 0, (-h) % stride)
        x = torch.cat([F.pad(image, pad) for image in images])
        if x.ndim == 5:
            if self.temporal is None:
                raise ValueError(f"a time series {tuple(x.shape)} needs a temporal aggregation")
            batch, dates = x.shape[:2]
            stages = [
                merge(s.view(batch, dates, *s.shape[1:]))
                for merge, s in zip(
                    self.temporal, self.encoder(x.flatten(0, 1)).stages, strict=True
                )
            ]
        else:
            stages = self.encoder(x).stages
        if self.paired:
            stages = [(a - b).abs() for a, b in (s.chunk(2) for s in stages)]
        logits = self.decoder(stages)
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :h, :w]

    def trainable_state(self) -> dict[str, Tensor]:
        """Copy of what training changes: the decoder (and temporal merge), plus the encoder when
        fine-tuned."""
        state = self.decoder.state_dict(prefix="decoder.")
        if self.temporal is not None:
            state |= self.temporal.state_dict(prefix="temporal.")
        if self.encoder.trainable:
            state |= self.encoder.state_dict(prefix="encoder.")
        return copy.deepcopy(state)


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Offsets of windows covering ``size`` pixels, the last one flush with the edge."""
    if size <= window:
        return [0]
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


@torch.inference_mode()
def sliding_window(
    model: nn.Module, images: Sequence[Tensor], window: int, stride: int, batch_size: int
) -> Tensor:
    """Logits of a whole (B, C, H, W) tile as the mean of the logits of overlapping windows.

    Windows are ``window`` pixels square (clipped to the tile) and run ``batch_size`` at a
    time; a window that covers the tile is plain whole-image inference.
    """
    h, w = images[0].shape[-2:]
    boxes = [
        (y, x, min(window, h), min(window, w))
        for y in window_starts(h, window, stride)
        for x in window_starts(w, window, stride)
    ]
    total: Tensor | None = None
    count = torch.zeros(1, 1, h, w, device=images[0].device)
    for first in range(0, len(boxes), batch_size):
        chunk = boxes[first : first + batch_size]
        crops = [
            torch.cat([image[..., y : y + wh, x : x + ww] for y, x, wh, ww in chunk])
            for image in images
        ]
        logits = model(*crops).split(images[0].shape[0])
        for (y, x, wh, ww), piece in zip(chunk, logits, strict=True):
            if total is None:
                total = torch.zeros(*piece.shape[:2], h, w, device=piece.device)
            total[..., y : y + wh, x : x + ww] += piece
            count[..., y : y + wh, x : x + ww] += 1
    assert total is not None
    return total / count


class TrainCrops(Dataset):
    """Random square crops (and flips) of a dense dataset, replayable from (seed, epoch, index).

    Each sample draws from its own generator, so the crops do not depend on worker count or
    loading order. Tiles smaller than the crop are padded: images with 0, the mask with the
    ignore index, so padding never counts in the loss.
    """

    def __init__(
        self, dataset: Dataset, keys: Sequence[str], crop: int, flip: bool, seed: int
    ) -> None:
        self.dataset = dataset
        self.keys = tuple(keys)
        self.crop = crop
        self.flip = flip
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        sample = self.dataset[index]
        mask = sample["mask"].long()
        images = [sample[k] for k in self.keys]
        h, w = mask.shape
        pad = (0, max(self.crop - w, 0), 0, max(self.crop - h, 0))
        if any(pad):
            images = [F.pad(image, pad) for image in images]
            mask = F.pad(mask, pad, value=IGNORE_INDEX)
            h, w = mask.shape
        g = torch.Generator().manual_seed(sub_seed(self.seed, self.epoch, index))
        y = int(torch.randint(h - self.crop + 1, (1,), generator=g))
        x = int(torch.randint(w - self.crop + 1, (1,), generator=g))
        flips = torch.rand(2, generator=g) < 0.5 if self.flip else torch.zeros(2, dtype=torch.bool)
        dims = [d for d, on in zip((-2, -1), flips.tolist(), strict=True) if on]
        out = [t[..., y : y + self.crop, x : x + self.crop] for t in (*images, mask)]
        return tuple(t.flip(dims) if dims else t for t in out)


def fit_dense(
    model: DenseModel,
    datasets: Mapping[str, Dataset],
    keys: Sequence[str],
    num_classes: int,
    score: Callable[[ConfusionMatrix], float],
    cfg: DenseConfig,
    seed: int,
) -> dict[str, float]:
    """Train the decoder (and encoder if fine-tuned), select the epoch on val, score test.

    Returns ``val`` (best validation score), ``test`` (score of that epoch's weights) and
    ``epoch`` (1-based).
    """
    check_splits(datasets)
    if cfg.epochs < 1 or cfg.batch_size < 2:
        raise ConfigError(
            f"dense protocol needs epochs >= 1 and batch_size >= 2 (BatchNorm in the decoder); "
            f"got epochs {cfg.epochs}, batch_size {cfg.batch_size}"
        )
    crops = TrainCrops(datasets["train"], keys, cfg.crop_size, cfg.flip, seed)
    # BatchNorm needs at least two samples per training batch: drop a trailing single one.
    drop_last = len(crops) % cfg.batch_size == 1 and len(crops) > 1
    loader = make_loader(crops, cfg.batch_size, seed=seed, workers=cfg.workers, drop_last=drop_last)
    params = [*model.decoder.parameters(), *model.encoder.trainable_parameters()]
    if model.temporal is not None:
        params += list(model.temporal.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * len(loader)
    milestones = [int(f * total) for f in _LR_MILESTONES]
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)

    with seeded(seed, cfg.device):
        model.to(cfg.device)
        history: list[float] = []
        best_state: dict[str, Tensor] = {}
        for epoch in range(cfg.epochs):
            crops.epoch = epoch
            model.train()
            for *images, mask in loader:
                logits = model(*(image.to(cfg.device) for image in images))
                loss = F.cross_entropy(logits, mask.to(cfg.device), ignore_index=IGNORE_INDEX)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
            history.append(score(evaluate_dense(model, datasets["val"], keys, num_classes, cfg)))
            log.info("epoch %d: loss %.4f, val %.4f", epoch + 1, loss.item(), history[-1])
            if best_index(history) == epoch:
                best_state = model.trainable_state()
        unexpected = model.load_state_dict(best_state, strict=False).unexpected_keys
        assert not unexpected, unexpected
        test = score(evaluate_dense(model, datasets["test"], keys, num_classes, cfg))
    best = best_index(history)
    return {"val": history[best], "test": test, "epoch": float(best + 1)}


def evaluate_dense(
    model: DenseModel, dataset: Dataset, keys: Sequence[str], num_classes: int, cfg: DenseConfig
) -> ConfusionMatrix:
    """Confusion matrix of sliding-window predictions over a whole split (tiles one by one)."""
    model.eval()
    matrix = ConfusionMatrix(num_classes)
    stride = cfg.stride or cfg.crop_size // 2
    for batch in make_loader(dataset, 1, workers=cfg.workers):
        images = [batch[k].to(cfg.device) for k in keys]
        logits = sliding_window(model, images, cfg.crop_size, stride, cfg.batch_size)
        matrix.update(logits.argmax(1), batch["mask"])
    return matrix
