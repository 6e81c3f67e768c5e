"""Sen1Floods11 hand-labelled flood maps, Sentinel-2 input, read from its GeoTIFFs.

Layout (the public ``sen1floods11`` bucket, mirrored under ``root``):

- ``v1.1/splits/flood_handlabeled/flood_{train,valid,test}_data.csv``: one chip per row,
  ``<Country>_<id>_S1Hand.tif,<Country>_<id>_LabelHand.tif``, no header;
- ``v1.1/data/flood_events/HandLabeled/S2Hand/<chip>_S2Hand.tif``: 13 Sentinel-2 L1C bands,
  B01 … B12 in wavelength order (B8A after B08), 512 × 512;
- ``v1.1/data/flood_events/HandLabeled/LabelHand/<chip>_LabelHand.tif``: -1 no data,
  0 no water, 1 water. No data becomes the ignore index.

The published files are not archived, so ``download=True`` fetches the split lists and then
each listed chip. Normalisation statistics are computed once on the ``train`` chips and cached.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import ClassVar

import numpy as np
import rasterio
from torch import Tensor

from deo.data.bands import SENTINEL2_BANDS
from deo.data.fetch import FetchItem
from deo.errors import DataError
from deo.evaluation.datasets.base import (
    IGNORE_INDEX,
    SPLITS,
    BenchmarkDataset,
    as_mask,
    ids_digest,
    low_label_subset,
)
from deo.evaluation.download import fetch
from deo.evaluation.inputs import BandStats, InputMapping, cached_stats, moments_stats

STATS_FILE = "deo_band_stats.json"
_CHIP = re.compile(r"(?P<chip>.+)_S[12]Hand\.tif")


class Sen1Floods11(BenchmarkDataset):
    """Water / no-water segmentation of Sen1Floods11's hand-labelled S2 chips."""

    task = "segmentation"
    host = "storage.googleapis.com/sen1floods11 (public bucket)"
    url = "https://storage.googleapis.com/sen1floods11/{path}"
    split_dir = "v1.1/splits/flood_handlabeled"
    split_files: ClassVar[dict[str, str]] = {
        "train": "flood_train_data.csv",
        "val": "flood_valid_data.csv",
        "test": "flood_test_data.csv",
    }
    image_dir = "v1.1/data/flood_events/HandLabeled/S2Hand"
    label_dir = "v1.1/data/flood_events/HandLabeled/LabelHand"
    bands: ClassVar[tuple[str, ...]] = tuple(b.name for b in SENTINEL2_BANDS)
    """Band order of an S2Hand GeoTIFF."""

    def __init__(
        self,
        root: Path | str,
        split: str = "train",
        partition: str = "default",
        download: bool = False,
        *,
        stats_cache: Path | None = None,
    ) -> None:
        super().__init__(root, split, partition, download)
        self.chips = low_label_subset(self._chips(split), split, partition, salt="Sen1Floods11")
        train = self._chips("train")

        def compute() -> BandStats:
            return moments_stats(self.bands, (self._image(c) for c in train))

        path = Path(stats_cache) if stats_cache else self.root / STATS_FILE
        stats = cached_stats(path, f"Sen1Floods11/train/{ids_digest(train)}", compute)
        self.mapping = InputMapping("ms", self.bands, stats=stats, source="Sen1Floods11")

    # -- files ---------------------------------------------------------------------------------

    def _split_csv(self, split: str) -> Path:
        return self.root / self.split_dir / self.split_files[split]

    def _chips(self, split: str) -> list[str]:
        """Chip ids of ``split``, in the order of its CSV."""
        path = self._split_csv(split)
        chips = []
        with path.open(newline="", encoding="utf-8") as handle:
            for row in csv.reader(handle):
                if not row or not row[0].strip():
                    continue
                match = _CHIP.fullmatch(row[0].strip())
                if match is None:
                    raise DataError(path, f"unexpected chip file name {row[0]!r}")
                chips.append(match["chip"])
        return chips

    def _image_path(self, chip: str) -> Path:
        return self.root / self.image_dir / f"{chip}_S2Hand.tif"

    def _label_path(self, chip: str) -> Path:
        return self.root / self.label_dir / f"{chip}_LabelHand.tif"

    def _missing(self) -> list[str]:
        lists = [self._split_csv(s) for s in SPLITS]
        if not all(p.is_file() for p in lists):
            return [p.relative_to(self.root).as_posix() for p in lists if not p.is_file()]
        chips = [c for s in SPLITS for c in self._chips(s)]
        files = [f(c) for c in chips for f in (self._image_path, self._label_path)]
        return [p.relative_to(self.root).as_posix() for p in files if not p.is_file()]

    def _csv_items(self) -> list[FetchItem]:
        return [
            FetchItem(self.url.format(path=f"{self.split_dir}/{name}"), self._split_csv(split))
            for split, name in self.split_files.items()
        ]

    def _fetch_items(self) -> list[FetchItem]:
        """The split lists and the chips of every list already present."""
        items = self._csv_items()
        for split in SPLITS:
            if self._split_csv(split).is_file():
                for chip in self._chips(split):
                    for path in (self._image_path(chip), self._label_path(chip)):
                        relative = path.relative_to(self.root).as_posix()
                        items.append(FetchItem(self.url.format(path=relative), path))
        return items

    def _download(self) -> None:
        fetch(self._csv_items(), self.root)  # the lists name the chips to fetch next
        fetch(self._fetch_items(), self.root)

    # -- samples -------------------------------------------------------------------------------

    def _image(self, chip: str) -> np.ndarray:
        path = self._image_path(chip)
        with rasterio.open(path) as src:
            if src.count != len(self.bands):
                raise DataError(path, f"{src.count} bands, expected {len(self.bands)}")
            return src.read().astype(np.float32)

    def __len__(self) -> int:
        return len(self.chips)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        chip = self.chips[index]
        with rasterio.open(self._label_path(chip)) as src:
            label = src.read(1).astype(np.int64)
        label[(label < 0) | (label > 1)] = IGNORE_INDEX
        return {"image": self.mapping(self._image(chip)), "mask": as_mask(label)}
