"""OSCD (Onera Satellite Change Detection), Sentinel-2 pairs, read through torchgeo's ``OSCD``.

Layout: ``root/Onera Satellite Change Detection dataset - Images/<city>/imgs_{1,2}_rect/B*.tif``
(13 bands at 10 m, one GeoTIFF each), ``... - {Train,Test} Labels/<city>/cm/cm.png`` (0 / 255),
unpacked from three zips.

OSCD publishes 14 training and 10 test cities and no validation split: ``val`` is about a
seventh of the training cities, chosen by ``hash_split``. Cities differ in size, so
``patch_size`` cuts each into non-overlapping square tiles, the last row and column padded
with the normalised mean (0) and the ignore index, so every pixel is scored exactly once.
Normalisation statistics are computed once on the ``train`` cities (both dates) and cached.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from deo.data.fetch import FetchItem
from deo.evaluation.datasets.base import (
    IGNORE_INDEX,
    BenchmarkDataset,
    as_mask,
    hash_split,
    ids_digest,
    low_label_subset,
    pad_crop,
)
from deo.evaluation.download import extract_zip
from deo.evaluation.inputs import MISSING_FILL, BandStats, InputMapping, cached_stats, moments_stats

STATS_FILE = "deo_band_stats.json"
_CACHED_REGIONS = 2


class OSCD(BenchmarkDataset):
    """OSCD train/val/test, as 10-band MS pairs tiled into ``patch_size`` squares (or whole
    cities with ``patch_size=None``)."""

    task = "change"
    host = "the OSCD authors' shares (partage.imt.fr, partage.mines-telecom.fr)"
    prefix = "Onera Satellite Change Detection dataset - "
    val_fraction = 1 / 7
    urls: ClassVar[dict[str, str]] = {
        prefix + "Images.zip": "https://partage.imt.fr/index.php/s/gKRaWgRnLMfwMGo/download",
        prefix + "Train Labels.zip": (
            "https://partage.mines-telecom.fr/index.php/s/2D6n03k58ygBSpu/download"
        ),
        prefix + "Test Labels.zip": "https://partage.imt.fr/index.php/s/gpStKn4Mpgfnr63/download",
    }
    """Archive → URL, as in torchgeo's ``OSCD.urls``."""

    def __init__(
        self,
        root: Path | str,
        split: str = "train",
        partition: str = "default",
        download: bool = False,
        *,
        patch_size: int | None = 256,
        stats_cache: Path | None = None,
    ) -> None:
        super().__init__(root, split, partition, download)
        self.patch_size = patch_size
        self._source = self._torchgeo("test" if split == "test" else "train")
        regions = [f["region"] for f in self._source.files]
        if split != "test":
            regions = self._carve(regions)[split]
        regions = low_label_subset(regions, split, partition, salt="OSCD")
        by_region = {f["region"]: i for i, f in enumerate(self._source.files)}
        self.regions = regions
        self._tiles = [t for r in regions for t in self._region_tiles(by_region[r])]
        stats = cached_stats(
            Path(stats_cache) if stats_cache else self.root / STATS_FILE, *self._stats_job()
        )
        self.mapping = InputMapping("ms", self._source.all_bands, stats=stats, source="OSCD")
        self._cache: OrderedDict[int, tuple[Tensor, Tensor, np.ndarray]] = OrderedDict()

    def _torchgeo(self, split: str) -> Any:
        # torchgeo.datasets takes seconds to import: paid only when this benchmark is read.
        from torchgeo.datasets import OSCD as TorchGeoOSCD

        source = TorchGeoOSCD(self.root, split=split, download=False)
        source.files.sort(key=lambda f: f["region"])  # torchgeo lists cities in glob order
        return source

    def _carve(self, regions: list[str]) -> dict[str, list[str]]:
        fractions = {"train": 1 - self.val_fraction, "val": self.val_fraction}
        return hash_split(regions, fractions, salt="OSCD")

    def _stats_job(self) -> tuple[str, Any]:
        """Cache key and computation of the statistics over the ``train`` cities."""
        source = self._source if self.split != "test" else self._torchgeo("train")
        train = set(self._carve([f["region"] for f in source.files])["train"])
        indices = [i for i, f in enumerate(source.files) if f["region"] in train]
        key = f"OSCD/train/{ids_digest(sorted(train))}"

        def compute() -> BandStats:
            images = (date.numpy() for i in indices for date in source[i]["image"])
            return moments_stats(source.all_bands, images)

        return key, compute

    # -- files ---------------------------------------------------------------------------------

    def _missing(self) -> list[str]:
        folders = [self.prefix + f for f in ("Images", "Train Labels", "Test Labels")]
        return [f"{f}/" for f in folders if not (self.root / f).is_dir()]

    def _archives(self) -> list[Path]:
        return [self.root / name for name in self.urls]

    def _fetch_items(self) -> list[FetchItem]:
        return [FetchItem(url, self.root / name) for name, url in self.urls.items()]

    def _extract(self) -> None:
        for archive in self._archives():
            extract_zip(archive, self.root)

    # -- samples -------------------------------------------------------------------------------

    def _region_tiles(self, index: int) -> list[tuple[int, int, int]]:
        with Image.open(self._source.files[index]["mask"]) as mask:
            width, height = mask.size
        if self.patch_size is None:
            return [(index, 0, 0)]
        step = self.patch_size
        return [
            (index, y * step, x * step)
            for y in range(math.ceil(height / step))
            for x in range(math.ceil(width / step))
        ]

    def _region(self, index: int) -> tuple[Tensor, Tensor, np.ndarray]:
        """Mapped date-1 and date-2 images and the mask of a city; the last few are kept."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        sample = self._source[index]
        pair = sample["image"].numpy()
        region = (self.mapping(pair[0]), self.mapping(pair[1]), sample["mask"][0].numpy())
        self._cache[index] = region
        if len(self._cache) > _CACHED_REGIONS:
            self._cache.popitem(last=False)
        return region

    def __len__(self) -> int:
        return len(self._tiles)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        region, y, x = self._tiles[index]
        image1, image2, mask = self._region(region)
        if self.patch_size is None:
            return {"image1": image1, "image2": image2, "mask": as_mask(mask)}
        size = self.patch_size
        return {
            "image1": torch.from_numpy(pad_crop(image1.numpy(), y, x, size, MISSING_FILL)),
            "image2": torch.from_numpy(pad_crop(image2.numpy(), y, x, size, MISSING_FILL)),
            "mask": as_mask(pad_crop(mask, y, x, size, IGNORE_INDEX)),
        }
