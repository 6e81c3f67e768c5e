"""GEO-Bench v1.0 tasks, read from their files without the geobench package.

A task folder holds one HDF5 file per sample (one 2-D dataset per band, named like
``"04 - Red"`` or ``"04 - Red_2019-11-05"`` when dated; segmentation tasks add a ``label``
dataset), ``band_stats.json`` (per band: mean, std, percentiles …), and partition files
``<partition>_partition.json`` mapping ``train``/``valid``/``test`` to sample names
(``default``, and low-label ones such as ``0.10x_train``).

The file attribute ``pickle`` holds a pickled dict with the classification label and band
metadata; it is read by ``pickle_literals`` without unpickling. ``task_specs.pkl`` is neither
extracted nor read: the band names, label and statistics are all in the files above.
"""

from __future__ import annotations

import abc
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from deo.data.bands import MS_BANDS
from deo.data.fetch import FetchItem
from deo.errors import DataError
from deo.evaluation.datasets.base import BenchmarkDataset, Task, as_mask
from deo.evaluation.datasets.pickle_literals import (
    PickleLiteralError,
    read_repr_literals,
    to_plain,
)
from deo.evaluation.download import extract_zip
from deo.evaluation.inputs import (
    RGB_CHANNELS,
    BandStats,
    InputMapping,
    Modality,
    value_scale,
)

log = logging.getLogger(__name__)

GEOBENCH_S2: dict[str, str] = {
    "01 - Coastal aerosol": "B01",
    "02 - Blue": "B02",
    "03 - Green": "B03",
    "04 - Red": "B04",
    "05 - Vegetation Red Edge": "B05",
    "06 - Vegetation Red Edge": "B06",
    "07 - Vegetation Red Edge": "B07",
    "08 - NIR": "B08",
    "08A - Vegetation Red Edge": "B8A",
    "09 - Water vapour": "B09",
    "10 - SWIR - Cirrus": "B10",
    "11 - SWIR": "B11",
    "12 - SWIR": "B12",
}
"""GEO-Bench's Sentinel-2 band names (``geobench.dataset.sentinel2_13_bands``) → ours."""

GEOBENCH_OPTICAL: dict[str, str] = {"Red": "red", "Green": "green", "Blue": "blue", "NIR": "nir"}
"""GEO-Bench's names of aerial/VHR optical bands (NAIP, drone, Google imagery) → ours."""

_DATED = re.compile(r"(?P<band>.+)_(?P<date>\d{4}-\d{2}-\d{2}.*)")
_SPLIT_KEYS = {"train": "train", "val": "valid", "test": "test"}


def canonical_band(key: str) -> str | None:
    """Our name of an HDF5 band dataset (date suffix ignored), or None if not an image band.

    Sentinel-1 bands (``"01 - VH.Real"`` …) and ``Cloud Probability`` map to None: they are
    not inputs of either embedding.
    """
    match = _DATED.fullmatch(key)
    name = match["band"] if match else key
    return GEOBENCH_S2.get(name) or GEOBENCH_OPTICAL.get(name)


def _band_keys(keys: Sequence[str]) -> dict[str, str]:
    """Canonical band → HDF5 key; of several dates the earliest is used (sorted keys)."""
    chosen: dict[str, str] = {}
    for key in sorted(keys):
        band = canonical_band(key)
        if band is not None and band not in chosen:
            chosen[band] = key
    return chosen


class GeoBench(BenchmarkDataset):
    """A GEO-Bench v1.0 task folder (``root``), one of ``files`` or any task in its format.

    ``task_name`` selects the archive ``download=True`` fetches from the Hugging Face dataset
    repo; a task not listed there (such as a synthetic demo task) reads the same way but can
    only be read from disk. ``modality`` picks the embedding: ``ms`` for Sentinel-2 tasks,
    ``rgb`` for aerial and VHR ones, divided by the product's value scale: ``rgb_scale`` when
    given, else read from the task (``band_stats.json``'s maximum of the optical bands and the
    files' dtype: m-chesapeake-landcover is float32 in [0, 1], other tasks integers to 255).
    """

    host = "huggingface.co/datasets/recursix/geo-bench-1.0"
    url = "https://huggingface.co/datasets/recursix/geo-bench-1.0/resolve/main/{path}"
    files: ClassVar[dict[str, str]] = {
        "m-bigearthnet": "classification_v1.0/m-bigearthnet.zip",
        "m-brick-kiln": "classification_v1.0/m-brick-kiln.zip",
        "m-eurosat": "classification_v1.0/m-eurosat.zip",
        "m-so2sat": "classification_v1.0/m-so2sat.zip",
        "m-cashew-plant": "segmentation_v1.0/m-cashew-plant.zip",
        "m-chesapeake-landcover": "segmentation_v1.0/m-chesapeake.zip",
        "m-nz-cattle": "segmentation_v1.0/m-nz-cattle.zip",
        "m-pv4ger-seg": "segmentation_v1.0/m-pv4ger-seg.zip",
        "m-SA-crop-type": "segmentation_v1.0/m-SA-crop-type.zip",
    }
    """Task → file in the Hugging Face repo (one zip per task)."""

    def __init__(
        self,
        root: Path | str,
        split: str = "train",
        partition: str = "default",
        download: bool = False,
        *,
        task_name: str,
        modality: Modality = "ms",
        rgb_scale: float | None = None,
    ) -> None:
        self.task_name = task_name
        super().__init__(root, split, partition, download)
        names = self._read_json(self._partition_path()).get(_SPLIT_KEYS[split])
        if names is None:
            raise DataError(self._partition_path(), f"no {_SPLIT_KEYS[split]!r} list")
        self.sample_names: list[str] = list(names)
        if not self.sample_names:
            raise DataError(self._partition_path(), f"empty {_SPLIT_KEYS[split]!r} list")
        with h5py.File(self._sample_path(0), "r") as f:
            keys = _band_keys(list(f.keys()))
            present = [b for b in (MS_BANDS if modality == "ms" else RGB_CHANNELS) if b in keys]
            dtype = f[keys[present[0]]].dtype if present else np.dtype(np.float32)
        self._read = [keys[b] for b in present]
        if modality == "rgb" and rgb_scale is None and present:
            rgb_scale = self._product_scale(dtype, [keys[b] for b in present])
        self.mapping = InputMapping(
            modality,
            present,
            stats=self._band_stats() if modality == "ms" else None,
            rgb_scale=rgb_scale,
            source=f"GEO-Bench {task_name}",
        )

    # -- files ---------------------------------------------------------------------------------

    def _partition_path(self) -> Path:
        return self.root / f"{self.partition}_partition.json"

    def _sample_path(self, index: int) -> Path:
        return self.root / f"{self.sample_names[index]}.hdf5"

    @staticmethod
    def _read_json(path: Path) -> dict[str, Any]:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(path, f"unreadable JSON: {exc}") from exc

    def _missing(self) -> list[str]:
        needed = [self.root / "band_stats.json", self._partition_path()]
        return [p.name for p in needed if not p.is_file()]

    def _archive(self) -> Path:
        return self.root / f"{self.task_name}.zip"

    def _archives(self) -> list[Path]:
        return [self._archive()]

    def _fetch_items(self) -> list[FetchItem]:
        if self.task_name not in self.files:
            raise DataError(
                self.root, f"GEO-Bench has no published task {self.task_name!r} to download"
            )
        url = self.url.format(path=self.files[self.task_name])
        return [FetchItem(url, self._archive())]

    def _extract(self) -> None:
        # Flat, as GEO-Bench's own downloader does: the nesting inside the zips varies, the
        # file names do not. Pickles are never written, so nothing can unpickle them later.
        extract_zip(self._archive(), self.root, flatten=True, wanted=_not_pickle)

    def _product_scale(self, dtype: np.dtype, keys: Sequence[str]) -> float:
        """The optical bands' value scale, from their declared maximum and their dtype."""
        path = self.root / "band_stats.json"
        entries = self._read_json(path)
        declared = [entries.get(k, entries.get(_undated(k), {})).get("max") for k in keys]
        known = [float(m) for m in declared if isinstance(m, int | float)]
        try:
            scale = value_scale(dtype, max(known) if known else None)
        except ValueError as exc:
            raise DataError(
                path, f"no value scale for the optical bands {list(keys)}: {exc}"
            ) from exc
        log.info(
            "GEO-Bench %s: %s optical values, declared max %s: scale %g",
            self.task_name,
            dtype,
            max(known) if known else "n/a",
            scale,
        )
        return scale

    def _band_stats(self) -> BandStats:
        """``band_stats.json`` re-keyed by canonical band name."""
        path = self.root / "band_stats.json"
        entries = self._read_json(path)
        renamed = {canonical_band(k): v for k, v in entries.items() if canonical_band(k)}
        try:
            return BandStats.from_json(renamed)  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(path, f"band statistics without mean/std: {exc}") from exc

    # -- samples -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.sample_names)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        path = self._sample_path(index)
        with h5py.File(path, "r") as f:
            missing = [k for k in self._read if k not in f]
            if missing:
                raise DataError(path, f"bands {missing} missing (present in the task's first file)")
            image = self.mapping(_same_shape([np.asarray(f[k], np.float32) for k in self._read]))
            return {"image": image, **self._target(f, image)}

    @abc.abstractmethod
    def _target(self, f: h5py.File, image: Tensor) -> dict[str, Tensor]:
        """The sample's label entries, read from its open file."""

    @staticmethod
    def _attrs(f: h5py.File) -> dict[str, Any]:
        """The file's pickled attribute dict, read as literals."""
        try:
            attrs = read_repr_literals(f.attrs["pickle"])
        except (KeyError, ValueError, SyntaxError, PickleLiteralError) as exc:
            raise DataError(f.filename, f"unreadable 'pickle' attribute: {exc}") from exc
        if not isinstance(attrs, dict):
            raise DataError(f.filename, "'pickle' attribute is not a dict")
        return attrs


def _undated(key: str) -> str:
    match = _DATED.fullmatch(key)
    return match["band"] if match else key


def _not_pickle(name: str) -> bool:
    return not name.endswith((".pkl", ".pickle"))


def _same_shape(layers: list[np.ndarray]) -> np.ndarray:
    """Stack bands, resampling (bilinear) any smaller one to the largest band's grid."""
    shape = max((a.shape for a in layers), key=lambda s: s[0] * s[1])
    out = []
    for a in layers:
        if a.shape != shape:
            t = torch.from_numpy(a)[None, None]
            a = F.interpolate(t, size=shape, mode="bilinear", align_corners=False)[0, 0].numpy()
        out.append(a)
    return np.stack(out)


class GeoBenchClassification(GeoBench):
    """A GEO-Bench classification task: single-label (``label`` an int64 scalar) or
    ``multilabel`` (a float32 multi-hot vector, as m-bigearthnet's 43 classes)."""

    def __init__(
        self,
        root: Path | str,
        split: str = "train",
        partition: str = "default",
        download: bool = False,
        *,
        task_name: str,
        modality: Modality = "ms",
        rgb_scale: float | None = None,
        multilabel: bool = False,
    ) -> None:
        self.multilabel = multilabel
        super().__init__(
            root,
            split,
            partition,
            download,
            task_name=task_name,
            modality=modality,
            rgb_scale=rgb_scale,
        )

    @property
    def task(self) -> Task:  # type: ignore[override]
        return "multilabel" if self.multilabel else "classification"

    def _target(self, f: h5py.File, image: Tensor) -> dict[str, Tensor]:
        raw = self._attrs(f).get("label")
        if raw is None:
            raise DataError(f.filename, "no label in the 'pickle' attribute")
        try:
            label = np.asarray(to_plain(raw))
        except PickleLiteralError as exc:
            raise DataError(f.filename, f"label is not plain data: {exc}") from exc
        if self.multilabel != (label.ndim == 1) or label.ndim > 1:
            kind = "a multi-hot vector" if self.multilabel else "one class index"
            raise DataError(f.filename, f"label {label!r} is not {kind}")
        if self.multilabel:
            return {"label": torch.from_numpy(label.astype(np.float32))}
        return {"label": torch.tensor(int(label), dtype=torch.int64)}


class GeoBenchSegmentation(GeoBench):
    """A GEO-Bench segmentation task: ``mask`` is the file's ``label`` dataset, class ids as
    published (GEO-Bench evaluates every class, so nothing is mapped to the ignore index)."""

    task = "segmentation"

    def _target(self, f: h5py.File, image: Tensor) -> dict[str, Tensor]:
        if "label" not in f:
            raise DataError(f.filename, "no 'label' dataset")
        mask = np.asarray(f["label"])
        if mask.ndim == 3:  # (H, W, 1) in some tasks
            mask = mask[..., 0]
        if mask.shape != image.shape[1:]:
            raise DataError(f.filename, f"label {mask.shape} vs image {tuple(image.shape[1:])}")
        return {"mask": as_mask(mask)}
