"""Small synthetic downstream benchmarks in the real formats, for the embedded default.

``write_demo_benchmarks`` writes, under ``root/<name>`` for each of ``DEMO_BENCHMARKS``:

- ``demo-classification``: a GEO-Bench classification task (one HDF5 per sample with 12
  Sentinel-2 bands named as GEO-Bench names them, B10 left out as in m-bigearthnet; the label
  in the pickled ``pickle`` attribute; ``band_stats.json``; ``default_partition.json`` and a
  ``0.50x_train`` low-label partition). Four scene types (lake, farmland, forest, town) are
  mixtures of land covers with overlapping proportions, so the mean spectrum alone separates
  them only partly and spatial/spectral features help;
- ``demo-segmentation``: a GEO-Bench segmentation task in the same layout plus a ``label``
  dataset: four classes (water, vegetation, crop, built-up) as smooth random regions, each
  region with its own slight spectral variation;
- ``demo-change``: LEVIR-CD as torchgeo reads it (``A/``, ``B/``, ``label/`` with
  ``<split>_<n>.png``): two 8-bit RGB dates of the same ground under different illumination,
  new buildings in the second, their footprints as the 0/255 change mask.

Spectra come from the pre-training mirror (``deo.data.mirror.SPECTRA``), so an encoder
distilled on the mirror sees familiar land covers. Everything is drawn from one seeded
generator per benchmark: the same seed writes the same pixels, labels and JSON.
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from deo.data.bands import file_index
from deo.data.mirror import COVERS, SPECTRA
from deo.evaluation.datasets.geobench import GEOBENCH_S2
from deo.evaluation.registry import DEMO_BENCHMARKS

log = logging.getLogger(__name__)

CLASSIFICATION = "demo-classification"
SEGMENTATION = "demo-segmentation"
CHANGE = "demo-change"

DEMO_S2_BANDS: tuple[str, ...] = tuple(n for n in GEOBENCH_S2 if n != "10 - SWIR - Cirrus")
"""GEO-Bench band names written to the demo tasks, in file order."""

SCENES: dict[str, dict[str, float]] = {
    "lake": {"water": 5.0, "vegetation": 2.0, "soil": 1.0, "crop": 0.5},
    "farmland": {"crop": 4.0, "soil": 2.5, "vegetation": 1.5},
    "forest": {"vegetation": 5.0, "crop": 1.5, "soil": 1.0, "water": 0.5},
    "town": {"concrete": 3.0, "asphalt": 2.5, "vegetation": 1.5, "containers": 1.0},
}
"""Classification classes: Dirichlet concentrations of their land-cover proportions."""

SEGMENTATION_CLASSES: tuple[str, ...] = ("water", "vegetation", "crop", "concrete")
"""Segmentation class ``k`` is land cover ``SEGMENTATION_CLASSES[k]``."""

_S2_KEEP = [file_index(GEOBENCH_S2[name]) for name in DEMO_S2_BANDS]
_RGB = [file_index(b) for b in ("B04", "B03", "B02")]
_RGB_FULL_SCALE = 3000.0  # reflectance × 10000 shown as 255: bright covers stay below it
_COVER = {name: i for i, name in enumerate(COVERS)}


@dataclass(frozen=True)
class DemoSizes:
    """Samples per split and tile size (pixels) of each demo benchmark."""

    train: int = 64
    val: int = 32
    test: int = 32
    tile: int = 32

    def splits(self) -> dict[str, int]:
        return {"train": self.train, "val": self.val, "test": self.test}


def write_demo_benchmarks(root: Path, seed: int, sizes: DemoSizes | None = None) -> dict[str, Path]:
    """Write the demo benchmarks under ``root``; their folders, by benchmark name."""
    sizes = sizes or DemoSizes()
    root = Path(root)
    seeds = np.random.SeedSequence(seed).spawn(3)
    writers = {
        CLASSIFICATION: _write_classification,
        SEGMENTATION: _write_segmentation,
        CHANGE: _write_change,
    }
    if set(writers) != set(DEMO_BENCHMARKS):
        raise RuntimeError("demo writers and DEMO_BENCHMARKS disagree")
    folders = {}
    for (name, write), child in zip(writers.items(), seeds, strict=True):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        write(folder, np.random.default_rng(child), sizes)
        folders[name] = folder
        log.info("wrote demo benchmark %s to %s", name, folder)
    return folders


# -- rendering ---------------------------------------------------------------------------------


def _regions(rng: np.random.Generator, weights: np.ndarray, size: int) -> np.ndarray:
    """An (size, size) map of smooth regions, index ``k`` covering about ``weights[k]``."""
    logits = (
        rng.normal(0.0, 1.0, (len(weights), 4, 4))
        + np.log(np.maximum(weights, 1e-3))[:, None, None]
    )
    field = torch.from_numpy(logits).float()[None]
    up = F.interpolate(field, size=(size, size), mode="bicubic", align_corners=False)[0]
    return up.argmax(0).numpy()


def _render(
    rng: np.random.Generator, covers: np.ndarray, spectra: np.ndarray, noise: float = 0.03
) -> np.ndarray:
    """13-band reflectance × 10000 of a cover-index map, with illumination, haze and noise."""
    image = np.moveaxis(spectra[covers], -1, 0)  # (13, H, W)
    gain = rng.uniform(0.8, 1.2)
    haze = rng.uniform(0.0, 150.0) * np.linspace(1.0, 0.3, len(image))[:, None, None]
    image = image * gain + haze
    image = image * (1.0 + rng.normal(0.0, noise, image.shape))
    return np.clip(image, 1.0, 10000.0)


def _varied_spectra(rng: np.random.Generator, names: list[str]) -> np.ndarray:
    """The mirror's spectra of ``names`` with a small per-scene variation of each cover."""
    base = SPECTRA[[_COVER[n] for n in names]]
    return base * (1.0 + rng.normal(0.0, 0.06, base.shape))


# -- GEO-Bench format --------------------------------------------------------------------------


def _write_hdf5(path: Path, bands: np.ndarray, label: int | np.ndarray) -> None:
    """One GEO-Bench sample: a dataset per band (int16), ``label`` as attr or dataset."""
    attrs: dict[str, object] = {}
    with h5py.File(path, "w") as f:
        for name, layer in zip(DEMO_S2_BANDS, bands[_S2_KEEP], strict=True):
            f.create_dataset(name, data=np.round(layer).astype(np.int16))
            attrs[name] = {"date": None, "date_id": None, "spatial_resolution": 10}
        order = list(DEMO_S2_BANDS)
        if isinstance(label, np.ndarray):
            f.create_dataset("label", data=label.astype(np.int16))
            attrs["label"] = {"date": None, "date_id": None, "spatial_resolution": 10}
            order.append("label")
        else:
            attrs["label"] = int(label)
        attrs["bands_order"] = order
        # GEO-Bench stores the repr of a pickled dict; this one holds plain data only.
        f.attrs["pickle"] = str(pickle.dumps(attrs, protocol=4))


def _write_task(
    folder: Path, samples: dict[str, list[tuple[np.ndarray, int | np.ndarray]]], classes: int
) -> None:
    """Sample files, ``band_stats.json`` (train statistics) and the partition files."""
    names: dict[str, list[str]] = {}
    count = 0
    for split, items in samples.items():
        names[split] = []
        for bands, label in items:
            name = f"id_{count:04d}"
            _write_hdf5(folder / f"{name}.hdf5", bands, label)
            names[split].append(name)
            count += 1
    train = np.stack([b[_S2_KEEP] for b, _ in samples["train"]])  # (N, 12, H, W)
    stats: dict[str, dict[str, float]] = {}
    for i, name in enumerate(DEMO_S2_BANDS):
        values = np.round(train[:, i]).astype(np.int16).astype(np.float64)
        stats[name] = {
            "max": float(values.max()),
            "mean": float(values.mean()),
            "median": float(np.median(values)),
            "min": float(values.min()),
            "percentile_1": float(np.percentile(values, 1)),
            "percentile_99": float(np.percentile(values, 99)),
            "std": float(values.std()),
        }
    labels = np.concatenate([np.ravel(label) for _, label in samples["train"]]).astype(float)
    stats["label"] = {
        "max": float(classes - 1),
        "mean": float(labels.mean()),
        "std": float(labels.std()),
    }
    partition = {"train": names["train"], "valid": names["val"], "test": names["test"]}
    _write_json(folder / "band_stats.json", stats)
    _write_json(folder / "default_partition.json", partition)
    half = {**partition, "train": names["train"][: max(1, len(names["train"]) // 2)]}
    _write_json(folder / "0.50x_train_partition.json", half)


def _write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_classification(folder: Path, rng: np.random.Generator, sizes: DemoSizes) -> None:
    scenes = list(SCENES.values())
    samples: dict[str, list[tuple[np.ndarray, int | np.ndarray]]] = {}
    for split, n in sizes.splits().items():
        samples[split] = []
        for i in range(n):
            label = i % len(scenes)  # balanced classes
            names = list(scenes[label])
            weights = rng.dirichlet(np.array([scenes[label][c] for c in names]))
            covers = _regions(rng, weights, sizes.tile)
            samples[split].append((_render(rng, covers, _varied_spectra(rng, names)), label))
    _write_task(folder, samples, len(scenes))


def _write_segmentation(folder: Path, rng: np.random.Generator, sizes: DemoSizes) -> None:
    names = list(SEGMENTATION_CLASSES)
    samples: dict[str, list[tuple[np.ndarray, int | np.ndarray]]] = {}
    for split, n in sizes.splits().items():
        samples[split] = []
        for _ in range(n):
            classes = _regions(rng, rng.dirichlet(np.full(len(names), 2.0)), sizes.tile)
            image = _render(rng, classes, _varied_spectra(rng, names))
            samples[split].append((image, classes))
    _write_task(folder, samples, len(names))


# -- LEVIR-CD format ---------------------------------------------------------------------------


def _rgb8(reflectance: np.ndarray) -> np.ndarray:
    """An (H, W, 3) uint8 image from 13-band reflectance: B04, B03, B02 scaled to 0..255."""
    rgb = reflectance[_RGB] / _RGB_FULL_SCALE * 255.0
    return np.moveaxis(np.clip(np.round(rgb), 0, 255).astype(np.uint8), 0, -1)


def _buildings(rng: np.random.Generator, size: int) -> np.ndarray:
    """A boolean (size, size) map of 0–3 new rectangular buildings."""
    built = np.zeros((size, size), dtype=bool)
    for _ in range(rng.integers(0, 4)):
        h, w = rng.integers(max(2, size // 8), max(3, size // 3), size=2)
        y, x = rng.integers(0, size - h), rng.integers(0, size - w)
        built[y : y + h, x : x + w] = True
    return built


def _write_change(folder: Path, rng: np.random.Generator, sizes: DemoSizes) -> None:
    ground_names = ["vegetation", "soil", "asphalt", "crop"]
    for sub in ("A", "B", "label"):
        (folder / sub).mkdir(exist_ok=True)
    for split, n in sizes.splits().items():
        for i in range(n):
            spectra = _varied_spectra(rng, [*ground_names, "concrete", "containers"])
            ground = _regions(rng, rng.dirichlet(np.full(len(ground_names), 2.0)), sizes.tile)
            built = _buildings(rng, sizes.tile)
            roofs = len(ground_names) + rng.integers(0, 2, size=built.shape)  # concrete or metal
            after = np.where(built, roofs, ground)
            name = f"{split}_{i}.png"
            Image.fromarray(_rgb8(_render(rng, ground, spectra))).save(folder / "A" / name)
            Image.fromarray(_rgb8(_render(rng, after, spectra))).save(folder / "B" / name)
            mask = built.astype(np.uint8) * 255
            Image.fromarray(mask).save(folder / "label" / name)
