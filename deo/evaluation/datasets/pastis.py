"""PASTIS crop-type semantic segmentation, read through torchgeo's ``PASTIS`` (S2, semantic).

Layout (PASTIS-R, as torchgeo reads it): ``root/PASTIS-R/metadata.geojson`` (``ID_PATCH``,
``Fold``), ``DATA_S2/S2_<id>.npy`` (T × 10 × 128 × 128 time series, bands B2 … B12 as in
``MS_BANDS``), ``ANNOTATIONS/TARGET_<id>.npy`` (semantic classes in channel 0).

With ``dates`` set (the default of the paper table's protocol, as PANGAEA runs it), a sample's
``image`` is a ``(dates, C, H, W)`` series of that many dates evenly spaced over the year
(``linspace`` over the available acquisitions, PANGAEA's selection); the protocol encodes each
date with the frozen encoder and aggregates over time before the decoder. With ``dates=None``
each series is reduced to its per-pixel temporal median (one image, which suppresses clouds
and keeps the season's typical spectrum), the simpler option. Splits are PASTIS's
official folds: 1–3 train, 4 val, 5 test. Class 19 ("void": parcels mostly outside their
patch) is the ignore index; the other 19 classes (0 background … 18) are scored.
Normalisation statistics are computed once on (at most ``max_stats_samples`` evenly spaced)
training medians and cached.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from deo.data.bands import MS_BANDS
from deo.data.fetch import FetchItem
from deo.evaluation.datasets.base import (
    IGNORE_INDEX,
    BenchmarkDataset,
    as_mask,
    ids_digest,
    low_label_subset,
)
from deo.evaluation.download import extract_zip
from deo.evaluation.inputs import BandStats, InputMapping, cached_stats, moments_stats

STATS_FILE = "deo_band_stats.json"


class PASTIS(BenchmarkDataset):
    """PASTIS folds as MS time series of ``dates`` dates (or temporal medians) with 19-class
    masks."""

    task = "segmentation"
    host = "zenodo.org/records/5735646 (PASTIS-R, as in torchgeo)"
    url = "https://zenodo.org/records/5735646/files/PASTIS-R.zip?download=1"
    filename = "PASTIS-R.zip"
    directory = "PASTIS-R"
    folds: ClassVar[dict[str, tuple[int, ...]]] = {"train": (1, 2, 3), "val": (4,), "test": (5,)}
    bands: ClassVar[tuple[str, ...]] = MS_BANDS
    """Band order of PASTIS's S2 arrays (B2, B3, B4, B5, B6, B7, B8, B8A, B11, B12)."""
    void_class = 19

    def __init__(
        self,
        root: Path | str,
        split: str = "train",
        partition: str = "default",
        download: bool = False,
        *,
        stats_cache: Path | None = None,
        max_stats_samples: int = 256,
        dates: int | None = None,
    ) -> None:
        if dates is not None and dates < 1:
            raise ValueError(
                f"PASTIS: dates must be a positive number of dates or None, not {dates}"
            )
        self.dates = dates
        super().__init__(root, split, partition, download)
        self._source = self._torchgeo(split)
        ids = [str(i) for i in self._source.idxs]
        chosen = set(low_label_subset(ids, split, partition, salt="PASTIS"))
        self._indices = [i for i, name in enumerate(ids) if name in chosen]
        train = self._source if split == "train" else self._torchgeo("train")
        picks = np.linspace(0, len(train) - 1, min(max_stats_samples, len(train))).round()
        picks = sorted({int(p) for p in picks})
        key = f"PASTIS/train/{ids_digest([str(train.idxs[i]) for i in picks])}"

        def compute() -> BandStats:
            return moments_stats(self.bands, (self._median(train, i) for i in picks))

        path = Path(stats_cache) if stats_cache else self.root / STATS_FILE
        stats = cached_stats(path, key, compute)
        self.mapping = InputMapping("ms", self.bands, stats=stats, source="PASTIS")

    def _torchgeo(self, split: str) -> Any:
        # torchgeo.datasets takes seconds to import: paid only when this benchmark is read.
        from torchgeo.datasets import PASTIS as TorchGeoPASTIS

        return TorchGeoPASTIS(self.root, folds=self.folds[split], bands="s2", download=False)

    @staticmethod
    def _median(source: Any, index: int) -> np.ndarray:
        """The per-pixel temporal median of a sample's S2 series, (10, H, W) float32."""
        series = np.load(source.files[index]["s2"]).astype(np.float32)
        return np.median(series, axis=0)

    def _missing(self) -> list[str]:
        metadata = f"{self.directory}/metadata.geojson"
        return [] if (self.root / metadata).is_file() else [metadata]

    def _archives(self) -> list[Path]:
        return [self.root / self.filename]

    def _fetch_items(self) -> list[FetchItem]:
        return [FetchItem(self.url, self.root / self.filename)]

    def _extract(self) -> None:
        extract_zip(self.root / self.filename, self.root)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        i = self._indices[index]
        if self.dates is None:
            image = self.mapping(self._median(self._source, i))
        else:
            series = np.load(self._source.files[i]["s2"])
            picks = np.linspace(0, len(series) - 1, self.dates).round().astype(int)
            image = torch.stack([self.mapping(series[t].astype(np.float32)) for t in picks])
        target = np.load(self._source.files[i]["semantic"])[0].astype(np.int64)
        target[target == self.void_class] = IGNORE_INDEX
        return {"image": image, "mask": as_mask(target)}
