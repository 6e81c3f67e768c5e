"""What every benchmark reader shares: the constructor, the ``_verify()`` order, splits, plots.

A reader yields model-ready samples (see ``deo.evaluation.inputs``):

- ``classification``: ``{"image": float32 (C, H, W), "label": int64 scalar}``;
- ``multilabel``: ``{"image", "label": float32 (K,) multi-hot}``;
- ``segmentation``: ``{"image", "mask": int64 (H, W)}``, ``IGNORE_INDEX`` where unlabelled;
- ``change``: ``{"image1", "image2", "mask": int64 (H, W) 0/1}``, ``IGNORE_INDEX`` likewise.

Splits are always ``train``, ``val`` and ``test``. Where a benchmark publishes fewer, the
missing ones are carved out of a published split by ``hash_split``: by a hash of each sample's
id, so membership never depends on file-system listing order or on the other samples.
``partition`` selects a low-label training subset: GEO-Bench ships its own partition files
(``0.10x_train`` …); elsewhere ``"<fraction>x_train"`` keeps that fraction of the training
samples, again chosen by hash, and leaves ``val`` and ``test`` whole.
"""

from __future__ import annotations

import abc
import hashlib
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor
from torch.utils.data import Dataset

from deo.data.fetch import FetchItem
from deo.errors import DataError
from deo.evaluation.download import fetch
from deo.evaluation.inputs import InputMapping, Modality

log = logging.getLogger(__name__)

Task = Literal["classification", "multilabel", "segmentation", "change"]

SPLITS: tuple[str, ...] = ("train", "val", "test")
IGNORE_INDEX = 255
"""Mask value of unlabelled pixels (and of padding) in segmentation and change masks."""

_LOW_LABEL = re.compile(r"(\d+(?:\.\d+)?)x_train")


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def ids_digest(ids: Sequence[str]) -> str:
    """A short digest of a sample list, to key caches computed on it."""
    return _digest("\n".join(ids))[:16]


def hash_split(ids: Sequence[str], fractions: dict[str, float], salt: str) -> dict[str, list[str]]:
    """Deal ``ids`` into named parts of about ``fractions`` each, by a salted hash of each id.

    Parts after the first get ``round(fraction * n)`` ids but at least one while the first
    keeps at least one; the first takes the rest. Each part keeps the order of ``ids``.
    """
    order = sorted(ids, key=lambda i: _digest(f"{salt}/{i}"))
    names = list(fractions)
    sizes: dict[str, int] = {}
    left = len(order)
    for name in names[1:]:
        want = max(1, round(fractions[name] * len(order)))
        sizes[name] = min(want, max(left - 1, 0))
        left -= sizes[name]
    sizes[names[0]] = left
    parts: dict[str, set[str]] = {}
    start = 0
    for name in [*names[1:], names[0]]:
        parts[name] = set(order[start : start + sizes[name]])
        start += sizes[name]
    return {name: [i for i in ids if i in parts[name]] for name in names}


def low_label_subset(ids: Sequence[str], split: str, partition: str, salt: str) -> list[str]:
    """``ids`` of ``split`` restricted to ``partition`` (``default`` or ``<fraction>x_train``)."""
    if partition == "default":
        return list(ids)
    match = _LOW_LABEL.fullmatch(partition)
    if match is None or not 0 < float(match.group(1)) <= 1:
        raise ValueError(f"partition must be 'default' or '<fraction>x_train', not {partition!r}")
    if split != "train":
        return list(ids)
    keep = max(1, math.ceil(float(match.group(1)) * len(ids))) if ids else 0
    chosen = set(sorted(ids, key=lambda i: _digest(f"{salt}/low-label/{i}"))[:keep])
    return [i for i in ids if i in chosen]


class BenchmarkDataset(Dataset[dict[str, Tensor]], abc.ABC):
    """One downstream benchmark split, yielding model-ready sample dicts.

    Subclasses set ``task`` and describe their files through the ``_missing``,
    ``_archives``, ``_fetch_items`` and ``_extract`` hooks; ``_verify`` runs them in the
    fixed order: extracted? archive present? download allowed? else a DataError that says
    which argument to change and which files were expected.
    """

    task: ClassVar[Task]
    host: ClassVar[str]
    """Where ``download=True`` fetches from, for the not-found message."""

    mapping: InputMapping

    def __init__(
        self,
        root: Path | str,
        split: str = "train",
        partition: str = "default",
        download: bool = False,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        self.root = Path(root)
        self.split = split
        self.partition = partition
        self.download = download
        self._verify()

    @property
    def modality(self) -> Modality:
        return self.mapping.modality

    @property
    def embedding(self) -> Modality:
        """The model path the samples are for (an optical benchmark may go through ``ms``)."""
        return self.mapping.embedding

    @property
    def missing_bands(self) -> tuple[str, ...]:
        """Model channels this benchmark does not provide (filled with the band mean)."""
        return self.mapping.missing_bands

    # -- files ---------------------------------------------------------------------------------

    @abc.abstractmethod
    def _missing(self) -> list[str]:
        """Files or folders the reader needs that are not under ``root`` ([] when ready)."""

    def _archives(self) -> list[Path]:
        """Archives that ``_extract`` unpacks; none for benchmarks published as plain files."""
        return []

    @abc.abstractmethod
    def _fetch_items(self) -> list[FetchItem]:
        """What ``download=True`` fetches, and where to."""

    def _extract(self) -> None:
        """Unpack ``_archives()`` into ``root``."""

    def _download(self) -> None:
        fetch(self._fetch_items(), self.root)

    def _verify(self) -> None:
        """Make the data usable or raise, in the fixed order (see the class docstring)."""
        name = type(self).__name__
        if not self._missing():
            return
        archives = self._archives()
        if archives and all(a.is_file() for a in archives):
            log.info("%s: extracting %s", name, ", ".join(a.name for a in archives))
            self._extract()
        elif self.download:
            log.info("%s: downloading into %s from %s", name, self.root, self.host)
            self._download()
            self._extract()
        else:
            absent = [str(a.relative_to(self.root)) for a in archives if not a.is_file()]
            place = f" or place {', '.join(absent)} in it" if absent else ""
            raise DataError(
                self.root,
                f"{name} data not found: {_listing(self._missing())} missing. "
                f"Pass download=True to fetch it from {self.host}{place}, or set root "
                "to the folder that holds it.",
            )
        missing = self._missing()
        if missing:
            raise DataError(self.root, f"{name}: {_listing(missing)} still missing after download")

    # -- plotting ------------------------------------------------------------------------------

    def _display(self, image: Tensor) -> np.ndarray:
        """An (H, W, 3) view of a model input: R, G, B, stretched to the 2–98th percentile."""
        if image.ndim == 4:  # a time series: show its first date
            image = image[0]
        optical = [0, 1, 2] if self.embedding == "rgb" else self.mapping.model.optical_channels
        rgb = image[list(optical)].numpy()
        if self.mapping.model.uses_spec or self.embedding == "ms":
            low, high = np.percentile(rgb, (2, 98))
            rgb = (rgb - low) / max(high - low, 1e-6)
        return np.clip(np.moveaxis(rgb, 0, -1), 0, 1)

    def plot(self, sample: dict[str, Tensor], suptitle: str | None = None) -> Figure:
        """A matplotlib Figure of ``sample`` (and of ``sample["prediction"]`` when present)."""
        panels: list[tuple[str, np.ndarray, dict[str, object]]] = []
        for key in ("image", "image1", "image2"):
            if key in sample:
                panels.append((key, self._display(sample[key]), {}))
        for key in ("mask", "prediction"):
            if key in sample and sample[key].ndim == 2:
                shown = np.ma.masked_equal(sample[key].numpy(), IGNORE_INDEX)
                panels.append((key, shown, {"cmap": "tab20", "interpolation": "none"}))
        fig = Figure(figsize=(4 * len(panels), 4.4))
        axes = np.atleast_1d(fig.subplots(1, len(panels)))
        for ax, (title, data, style) in zip(axes, panels, strict=True):
            ax.imshow(data, **style)
            ax.set_title(title)
            ax.axis("off")
        if "label" in sample:
            label = sample["label"]
            text = f"label {int(label)}" if label.ndim == 0 else f"labels {label.nonzero().ravel()}"
            axes[0].set_title(text)
        if suptitle is not None:
            fig.suptitle(suptitle)
        return fig


def _listing(paths: list[str], shown: int = 3) -> str:
    """``a, b, c and 7 more`` for error messages about many files."""
    more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
    return ", ".join(paths[:shown]) + more


def pad_crop(array: np.ndarray, y: int, x: int, size: int, fill: float) -> np.ndarray:
    """The ``size`` × ``size`` window at (y, x) of a (..., H, W) array, padded with ``fill``."""
    window = array[..., y : y + size, x : x + size]
    pad_h, pad_w = size - window.shape[-2], size - window.shape[-1]
    if pad_h or pad_w:
        widths = [(0, 0)] * (array.ndim - 2) + [(0, pad_h), (0, pad_w)]
        window = np.pad(window, widths, constant_values=fill)
    return window


def as_mask(array: np.ndarray) -> Tensor:
    """An int64 (H, W) mask tensor."""
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))
