"""LEVIR-CD building change detection, read through torchgeo's ``LEVIRCD``.

Layout (torchgeo 0.8): ``root/{A,B,label}/<split>_<n>.png``, unpacked from ``train.zip``,
``val.zip`` and ``test.zip`` (each holding ``A/``, ``B/``, ``label/``). Images are 8-bit RGB
pairs, masks 0 (no change) / 255 (change); torchgeo clamps masks to 0/1.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
from torch import Tensor

from deo.data.fetch import FetchItem
from deo.evaluation.datasets.base import SPLITS, BenchmarkDataset, low_label_subset
from deo.evaluation.download import extract_zip
from deo.evaluation.inputs import RGB_CHANNELS, InputMapping, value_scale


class LEVIRCD(BenchmarkDataset):
    """LEVIR-CD's published train/val/test splits, as RGB image pairs in [0, 1]."""

    task = "change"
    host = "Google Drive (the LEVIR-CD authors' links, as listed by torchgeo)"
    url = "https://drive.usercontent.google.com/download?id={id}&export=download&confirm=t"
    files: ClassVar[dict[str, tuple[str, str]]] = {
        "train": ("train.zip", "18GuoCuBn48oZKAlEo-LrNwABrFhVALU-"),
        "val": ("val.zip", "1BqSt4ueO7XAyQ_84mUjswUSJt13ZBuzG"),
        "test": ("test.zip", "1jj3qJD_grJlgIhUWO09zibRGJe0R4Tn0"),
    }
    """Split → (archive, Google Drive file id); torchgeo's ``LEVIRCD.splits`` hold the same."""

    def __init__(
        self,
        root: Path | str,
        split: str = "train",
        partition: str = "default",
        download: bool = False,
        *,
        rgb_scale: float | None = None,
    ) -> None:
        super().__init__(root, split, partition, download)
        # torchgeo.datasets takes seconds to import: paid only when this benchmark is read.
        from torchgeo.datasets import LEVIRCD as TorchGeoLEVIRCD

        self._source = TorchGeoLEVIRCD(self.root, split=split, download=False)
        ids = [Path(f["image1"]).stem for f in self._source.files]
        chosen = set(low_label_subset(ids, split, partition, salt="LEVIR-CD"))
        self._indices = [i for i, name in enumerate(ids) if name in chosen]
        if rgb_scale is None and self._source.files:
            rgb_scale = png_scale(Path(self._source.files[0]["image1"]))
        self.mapping = InputMapping("rgb", RGB_CHANNELS, rgb_scale=rgb_scale, source="LEVIR-CD")

    def _missing(self) -> list[str]:
        return [
            f"{folder}/{split}_*.png"
            for folder in ("A", "B", "label")
            for split in SPLITS
            if not any((self.root / folder).glob(f"{split}_*.png"))
        ]

    def _archives(self) -> list[Path]:
        return [self.root / name for name, _ in self.files.values()]

    def _fetch_items(self) -> list[FetchItem]:
        return [FetchItem(self.url.format(id=i), self.root / n) for n, i in self.files.values()]

    def _extract(self) -> None:
        for archive in self._archives():
            extract_zip(archive, self.root)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        sample = self._source[self._indices[index]]
        pair = sample["image"].numpy()  # (2, 3, H, W), 0..255
        return {
            "image1": self.mapping(pair[0]),
            "image2": self.mapping(pair[1]),
            "mask": sample["mask"][0].long(),
        }


def png_scale(path: Path) -> float:
    """The value scale of an image file, from its pixel type (8-bit PNGs: 255)."""
    from PIL import Image

    with Image.open(path) as image:
        return value_scale(np.asarray(image).dtype)
