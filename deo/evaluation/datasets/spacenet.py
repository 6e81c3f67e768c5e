"""SpaceNet 1 building footprints (Rio de Janeiro), read through torchgeo's ``SpaceNet1``.

Layout: ``root/SN1_buildings/train/{3band,geojson}/`` unpacked from the two training tarballs
on the public ``spacenet-dataset`` S3 bucket; torchgeo resamples each 8-bit RGB chip to
406 × 439 px and rasterises the GeoJSON polygons into a 0/1 building mask.

Only SpaceNet 1's training release has labels (its test chips come without), so ``train``,
``val`` and ``test`` are 70 / 10 / 20 % of the labelled chips, chosen by ``hash_split`` on
the chip id.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from torch import Tensor

from deo.data.extract import extract_tar
from deo.data.fetch import FetchItem
from deo.evaluation.datasets.base import BenchmarkDataset, hash_split, low_label_subset
from deo.evaluation.inputs import RGB_CHANNELS, InputMapping, value_scale


class SpaceNet1(BenchmarkDataset):
    """Binary building segmentation on SpaceNet 1's pan-sharpened RGB chips, in [0, 1]."""

    task = "segmentation"
    host = "s3://spacenet-dataset (public; s3:// needs the deo[s3] extra)"
    url = "s3://spacenet-dataset/spacenet/SN1_buildings/tarballs/{name}"
    tarballs: ClassVar[tuple[str, ...]] = (
        "SN1_buildings_train_AOI_1_Rio_3band.tar.gz",
        "SN1_buildings_train_AOI_1_Rio_geojson_buildings.tar.gz",
    )
    fractions: ClassVar[dict[str, float]] = {"train": 0.7, "val": 0.1, "test": 0.2}

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
        from torchgeo.datasets import SpaceNet1 as TorchGeoSpaceNet1

        self._source = TorchGeoSpaceNet1(self.root, split="train", image="3band", download=False)
        ids = [Path(p).stem.removeprefix("3band_") for p in self._source.images]
        chosen = hash_split(ids, dict(self.fractions), salt="SpaceNet1")[split]
        chosen = low_label_subset(chosen, split, partition, salt="SpaceNet1")
        position = {chip: i for i, chip in enumerate(ids)}
        self._indices = [position[chip] for chip in chosen]
        if rgb_scale is None and self._source.images:
            rgb_scale = tif_scale(Path(self._source.images[0]))
        self.mapping = InputMapping("rgb", RGB_CHANNELS, rgb_scale=rgb_scale, source="SpaceNet1")

    def _folder(self) -> Path:
        return self.root / "SN1_buildings" / "train"

    def _missing(self) -> list[str]:
        wanted = {"3band": "*.tif", "geojson": "*.geojson"}
        return [
            f"SN1_buildings/train/{sub}/{pattern}"
            for sub, pattern in wanted.items()
            if not any((self._folder() / sub).glob(pattern))
        ]

    def _archives(self) -> list[Path]:
        return [self._folder() / name for name in self.tarballs]

    def _fetch_items(self) -> list[FetchItem]:
        return [FetchItem(self.url.format(name=a.name), a) for a in self._archives()]

    def _extract(self) -> None:
        for archive in self._archives():
            extract_tar(archive, self._folder())

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        sample = self._source[self._indices[index]]
        return {"image": self.mapping(sample["image"].numpy()), "mask": sample["mask"].long()}


def tif_scale(path: Path) -> float:
    """The value scale of a GeoTIFF, from its band dtype (SpaceNet 1's 3-band chips: uint8)."""
    import rasterio

    with rasterio.open(path) as source:
        return value_scale(source.dtypes[0])
