"""Benchmark readers on real-format files: the shared test data (written by torchgeo and
GEO-Bench) read in place, and tiny Sen1Floods11 / PASTIS / GEO-Bench fakes written here by
seeded code in the benchmarks' real layouts. No network: downloads are stubbed."""

from __future__ import annotations

import builtins
import json
import logging
import os
import pickle
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import rasterio
import torch
from matplotlib.figure import Figure
from PIL import Image
from rasterio.transform import from_origin

from deo.data.fetch import FetchItem
from deo.errors import ConfigError, DataError
from deo.evaluation import registry
from deo.evaluation.datasets import (
    IGNORE_INDEX,
    LEVIRCD,
    OSCD,
    PASTIS,
    GeoBenchClassification,
    GeoBenchSegmentation,
    Sen1Floods11,
    SpaceNet1,
)
from deo.evaluation.datasets import base as base_module
from deo.evaluation.datasets.base import hash_split, low_label_subset
from deo.evaluation.datasets.pickle_literals import Opaque, read_literals, to_plain
from deo.evaluation.download import extract_zip
from deo.evaluation.inputs import BandStats, InputMapping
from deo.models.input_spec import MODEL_BANDS

pytestmark = pytest.mark.timeout(120)

SHARED = Path(__file__).parents[1].parent / "shared" / "testdata"
BRICK_KILN = SHARED / "geobench" / "brick_kiln_v1.0"
TORCHGEO = SHARED / "torchgeo"


def shared(path: Path) -> Path:
    """A folder of the shared test data, or skip: it is written by others, not shipped here."""
    if not path.exists():
        pytest.skip(f"shared test data {path} is absent (see shared/testdata/README.md)")
    return path


@pytest.fixture
def no_fetch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any download attempt fail the test."""

    def refuse(items: list[FetchItem], root: Path) -> None:
        raise AssertionError(f"unexpected download of {[i.url for i in items]}")

    monkeypatch.setattr(base_module, "fetch", refuse)


@pytest.fixture
def no_pickles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail on any unpickling and on opening any .pkl file."""

    def trap(*args: object, **kwargs: object) -> None:
        raise AssertionError("something tried to unpickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, trap)
    real_open, real_os_open = builtins.open, os.open

    def guarded_open(file: object, *args: object, **kwargs: object) -> object:
        if str(file).endswith(".pkl"):
            raise AssertionError(f"opened {file}")
        return real_open(file, *args, **kwargs)  # type: ignore[call-overload]

    def guarded_os_open(path: object, *args: object, **kwargs: object) -> int:
        if str(path).endswith(".pkl"):
            raise AssertionError(f"opened {path}")
        return real_os_open(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)


# -- band mapping ------------------------------------------------------------------------------


def test_ms_mapping_normalises_by_band_name_and_fills_missing_bands_with_the_mean(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bands = ("B04", "B02", "B03", "B08", "B11")  # scrambled and incomplete on purpose
    stats = BandStats({b: 100.0 * (i + 1) for i, b in enumerate(bands)}, dict.fromkeys(bands, 2.0))
    image = np.arange(5 * 2 * 2, dtype=np.float32).reshape(5, 2, 2) + 1000
    with caplog.at_level(logging.WARNING):
        mapping = InputMapping("ms", bands, stats=stats, source="fake")
    out = mapping(image)
    assert out.shape == (10, 2, 2) and out.dtype == torch.float32
    for src, band in enumerate(bands):
        expected = (image[src] - stats.mean[band]) / stats.std[band]
        np.testing.assert_allclose(out[MODEL_BANDS.index(band)].numpy(), expected, rtol=1e-6)
    assert mapping.missing_bands == ("B05", "B06", "B07", "B8A", "B12")
    for band in mapping.missing_bands:
        assert torch.all(out[MODEL_BANDS.index(band)] == 0)
    assert "fake lacks B05, B06, B07, B8A, B12" in caplog.text


def test_rgb_mapping_scales_to_unit_range_and_refuses_missing_channels() -> None:
    image = np.array([[[0, 255]], [[51, 510]], [[102, 20]]], dtype=np.float32)
    out = InputMapping("rgb", ("red", "green", "blue"), rgb_scale=255.0)(image)
    np.testing.assert_allclose(out.numpy(), np.clip(image / 255.0, 0, 1), rtol=1e-6)
    with pytest.raises(DataError, match="RGB input needs"):
        InputMapping("rgb", ("red", "green", "nir"))


def test_ms_mapping_needs_statistics_for_every_present_band() -> None:
    with pytest.raises(DataError, match="B03"):
        InputMapping("ms", ("B02", "B03"), stats=BandStats({"B02": 1.0}, {"B02": 1.0}))


# -- pickles read as literals ------------------------------------------------------------------


def test_pickle_literals_decode_numpy_labels_without_calling_anything(tmp_path: Path) -> None:
    label = np.array([0, 1, 1, 0], dtype=np.int64)
    data = pickle.dumps({"label": label, "n": np.int32(3), "t": (1.5, "x")}, protocol=4)
    value = read_literals(data)
    np.testing.assert_array_equal(to_plain(value["label"]), label)
    assert to_plain(value["n"]) == 3 and value["t"] == (1.5, "x")

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
            return os.system, (f"touch {marker}",)

    hostile = read_literals(pickle.dumps({"label": Exploit()}))
    assert isinstance(hostile["label"], Opaque) and not marker.exists()
    with pytest.raises(ValueError, match="not plain data"):
        to_plain(hostile["label"])


# -- GEO-Bench ---------------------------------------------------------------------------------


def test_geobench_brick_kiln_classification(no_pickles: None, no_fetch: None) -> None:
    root = shared(BRICK_KILN)
    partition = json.loads((root / "default_partition.json").read_text())
    stats = json.loads((root / "band_stats.json").read_text())
    for split, key in (("train", "train"), ("val", "valid"), ("test", "test")):
        ds = GeoBenchClassification(root, split, task_name="m-brick-kiln")
        assert ds.sample_names == partition[key] and len(ds) == 5
    sample = ds[2]
    assert set(sample) == {"image", "label"}
    assert sample["image"].shape == (10, 64, 64) and sample["image"].dtype == torch.float32
    assert sample["label"].dtype == torch.int64 and sample["label"].ndim == 0
    assert int(sample["label"]) == 0  # the file's pickle: ... 'label' BININT1 0
    assert ds.modality == "ms" and ds.missing_bands == ()
    with h5py.File(root / f"{ds.sample_names[2]}.hdf5", "r") as f:
        for band, name in (
            ("B02", "02 - Blue"),
            ("B04", "04 - Red"),
            ("B8A", "08A - Vegetation Red Edge"),
        ):
            channel = MODEL_BANDS.index(band)
            raw = np.asarray(f[name], dtype=np.float64)
            expected = (raw - stats[name]["mean"]) / stats[name]["std"]
            np.testing.assert_allclose(sample["image"][channel].numpy(), expected, 1e-5, 1e-5)
    assert isinstance(ds.plot(sample), Figure)


def _geobench_pickle(label: object, bands: list[str]) -> str:
    attrs: dict[str, object] = {name: {"date": None, "spatial_resolution": 10} for name in bands}
    attrs["label"] = label
    return str(pickle.dumps(attrs, protocol=4))


def write_fake_geobench(
    root: Path,
    bands: list[str],
    labels: list[object],
    *,
    mask: bool = False,
    size: int = 8,
    seed: int = 0,
) -> Path:
    """A GEO-Bench task folder: one HDF5 per sample, band_stats.json, default_partition.json."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    names = [f"id_{i}" for i in range(len(labels))]
    for name, label in zip(names, labels, strict=True):
        with h5py.File(root / f"{name}.hdf5", "w") as f:
            for band in bands:
                f.create_dataset(band, data=rng.integers(1, 255, (size, size)).astype(np.int16))
            if mask:
                f.create_dataset("label", data=rng.integers(0, 3, (size, size)))
            f.attrs["pickle"] = _geobench_pickle(None if mask else label, bands)
    # GEO-Bench's band_stats.json declares each band's range beside its moments.
    stats = {
        b: {"mean": 100.0 + i, "std": 10.0 + i, "min": 1.0, "max": 254.0}
        for i, b in enumerate(bands)
    }
    (root / "band_stats.json").write_text(json.dumps(stats))
    partition = {"train": names, "valid": names[:1], "test": names[1:]}
    (root / "default_partition.json").write_text(json.dumps(partition))
    return root


S2_NAMES = [
    "01 - Coastal aerosol",
    "02 - Blue",
    "03 - Green",
    "04 - Red",
    "06 - Vegetation Red Edge",  # no B05
    "07 - Vegetation Red Edge",
    "08 - NIR",
    "08A - Vegetation Red Edge",
    "09 - Water vapour",
    "11 - SWIR",
    "12 - SWIR",
    "Cloud Probability",
]


def test_geobench_missing_band_is_the_normalised_mean_and_recorded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = write_fake_geobench(tmp_path / "task", S2_NAMES, [0, 1, 2])
    with caplog.at_level(logging.WARNING):
        ds = GeoBenchClassification(root, "train", task_name="fake")
    assert ds.missing_bands == ("B05",) and "lacks B05" in caplog.text
    image = ds[1]["image"]
    assert torch.all(image[MODEL_BANDS.index("B05")] == 0)
    with h5py.File(root / "id_1.hdf5", "r") as f:
        raw = np.asarray(f["06 - Vegetation Red Edge"], dtype=np.float64)
    np.testing.assert_allclose(image[MODEL_BANDS.index("B06")].numpy(), (raw - 104.0) / 14.0)
    assert [int(ds[i]["label"]) for i in range(3)] == [0, 1, 2]


def test_geobench_multilabel_rgb_and_segmentation(tmp_path: Path) -> None:
    hot = [np.array([1, 0, 1, 0], dtype=np.int64), np.array([0, 0, 0, 1], dtype=np.int64)]
    root = write_fake_geobench(tmp_path / "ml", S2_NAMES, hot)
    ds = GeoBenchClassification(root, "train", task_name="fake", multilabel=True)
    assert ds.task == "multilabel"
    label = ds[0]["label"]
    assert label.dtype == torch.float32 and label.tolist() == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(DataError, match="not one class index"):
        GeoBenchClassification(root, "train", task_name="fake")[0]

    rgb = write_fake_geobench(tmp_path / "rgb", ["Red", "Green", "Blue", "NIR"], [0, 1], mask=True)
    seg = GeoBenchSegmentation(rgb, "test", task_name="fake", modality="rgb")
    sample = seg[0]
    assert seg.task == "segmentation" and seg.modality == "rgb"
    assert sample["image"].shape == (3, 8, 8) and 0 <= sample["image"].min() <= 1
    assert sample["mask"].dtype == torch.int64 and sample["mask"].shape == (8, 8)
    with h5py.File(rgb / "id_1.hdf5", "r") as f:
        np.testing.assert_allclose(sample["image"][1].numpy(), np.asarray(f["Green"]) / 255.0)
        np.testing.assert_array_equal(sample["mask"].numpy(), np.asarray(f["label"]))
    assert isinstance(seg.plot(sample), Figure)


def test_geobench_archive_is_extracted_flat_without_its_pickles(
    tmp_path: Path, no_pickles: None, no_fetch: None
) -> None:
    source = write_fake_geobench(tmp_path / "src", S2_NAMES, [0, 1])
    root = tmp_path / "m-eurosat"
    root.mkdir()
    with zipfile.ZipFile(root / "m-eurosat.zip", "w") as zf:
        for path in source.iterdir():
            zf.write(path, f"m-eurosat/{path.name}")
        zf.writestr("m-eurosat/task_specs.pkl", b"trap: must never be written or read")
    ds = GeoBenchClassification(root, "train", task_name="m-eurosat")
    assert len(ds) == 2 and not (root / "task_specs.pkl").exists()
    assert not list(root.rglob("*.pkl"))


def test_geobench_download_fetches_the_hugging_face_zip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = write_fake_geobench(tmp_path / "src", S2_NAMES, [0, 1])
    fetched: list[FetchItem] = []

    def fake_fetch(items: list[FetchItem], root: Path) -> None:
        fetched.extend(items)
        items[0].dest.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(items[0].dest, "w") as zf:
            for path in source.iterdir():
                zf.write(path, path.name)

    monkeypatch.setattr(base_module, "fetch", fake_fetch)
    root = tmp_path / "eurosat"
    with pytest.raises(DataError, match="download=True") as error:
        GeoBenchClassification(root, "train", task_name="m-eurosat")
    assert "m-eurosat.zip" in str(error.value) and not fetched
    GeoBenchClassification(root, "train", download=True, task_name="m-eurosat")
    assert fetched == [
        FetchItem(
            "https://huggingface.co/datasets/recursix/geo-bench-1.0/resolve/main/"
            "classification_v1.0/m-eurosat.zip",
            root / "m-eurosat.zip",
        )
    ]
    with pytest.raises(DataError, match="no published task"):
        GeoBenchClassification(tmp_path / "x", "train", download=True, task_name="demo-x")


# -- LEVIR-CD and the _verify order ------------------------------------------------------------


def test_levircd_reads_torchgeo_layout(no_fetch: None) -> None:
    root = shared(TORCHGEO / "levircd" / "levircd")
    ds = LEVIRCD(root, "val")
    assert len(ds) == 2
    sample = ds[1]
    assert set(sample) == {"image1", "image2", "mask"}
    assert sample["image1"].shape == (3, 32, 32) and sample["image1"].dtype == torch.float32
    with Image.open(root / "B" / "val_1.png") as png:
        expected = np.moveaxis(np.asarray(png.convert("RGB"), dtype=np.float32), -1, 0) / 255
    np.testing.assert_allclose(sample["image2"].numpy(), expected, rtol=1e-6)
    assert set(sample["mask"].unique().tolist()) <= {0, 1} and sample["mask"].dtype == torch.int64
    assert isinstance(ds.plot(sample), Figure)


def test_verify_order_extracted_then_archive_then_download_then_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    zips = shared(TORCHGEO / "levircd" / "levircd")
    calls: list[str] = []

    def fake_fetch(items: list[FetchItem], root: Path) -> None:
        calls.append("fetch")
        assert [i.dest.name for i in items] == ["train.zip", "val.zip", "test.zip"]
        assert items[0].url == (
            "https://drive.usercontent.google.com/download"
            "?id=18GuoCuBn48oZKAlEo-LrNwABrFhVALU-&export=download&confirm=t"
        )
        for item in items:
            item.dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(zips / item.dest.name, item.dest)

    monkeypatch.setattr(base_module, "fetch", fake_fetch)
    # 1. nothing there, download not allowed: an error naming the argument and the archives
    empty = tmp_path / "empty"
    with pytest.raises(DataError) as error:
        LEVIRCD(empty, "train")
    assert "download=True" in str(error.value) and "train.zip" in str(error.value)
    assert calls == []
    # 2. archives present: extracted, nothing fetched even though download is allowed
    local = tmp_path / "local"
    local.mkdir()
    for name in ("train.zip", "val.zip", "test.zip"):
        shutil.copy(zips / name, local / name)
    assert len(LEVIRCD(local, "test", download=True)) == 2 and calls == []
    # 3. already extracted: neither extracted again nor fetched
    monkeypatch.setattr(
        "deo.evaluation.datasets.levircd.extract_zip", lambda *a, **k: calls.append("extract")
    )
    assert len(LEVIRCD(local, "train")) == 2 and calls == []
    # 4. nothing there, download allowed: fetched, then extracted
    monkeypatch.undo()
    monkeypatch.setattr(base_module, "fetch", fake_fetch)
    assert len(LEVIRCD(tmp_path / "fresh", "train", download=True)) == 2
    assert calls == ["fetch"]


def test_extract_zip_refuses_paths_outside_and_links(tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok/a.txt", b"fine")
        zf.writestr("../escape.txt", b"no")
        zf.writestr("/abs.txt", b"no")
        link = zipfile.ZipInfo("ok/link")
        link.external_attr = (0o120777 << 16) | 0
        zf.writestr(link, "/etc/passwd")
    report = extract_zip(archive, tmp_path / "out")
    assert report.extracted == ["ok/a.txt"]
    assert dict(report.skipped) == {
        "../escape.txt": "'..' path component refused",
        "/abs.txt": "absolute path refused",
        "ok/link": "symlink refused",
    }
    assert (
        not (tmp_path / "escape.txt").exists() and not (tmp_path / "out" / "ok" / "link").exists()
    )
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="corrupt"):
        extract_zip(tmp_path / "bad.zip", tmp_path / "out")


# -- OSCD --------------------------------------------------------------------------------------


def test_oscd_splits_tiles_mapping_and_cached_statistics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_fetch: None
) -> None:
    root = shared(TORCHGEO / "oscd")
    cache = tmp_path / "stats.json"
    train = OSCD(root, "train", patch_size=48, stats_cache=cache)
    assert cache.is_file()
    monkeypatch.setattr(
        "deo.evaluation.datasets.oscd.moments_stats", lambda *a: pytest.fail("recomputed")
    )
    val = OSCD(root, "val", patch_size=48, stats_cache=cache)
    test = OSCD(root, "test", patch_size=None, stats_cache=cache)
    assert sorted(train.regions + val.regions) == ["train1", "train2"]
    assert not set(train.regions) & set(val.regions) and test.regions == ["test"]
    assert len(train) == 4  # a 64 × 64 city in 48 px tiles: 2 × 2, edges padded
    corner = train[3]
    assert corner["image1"].shape == (10, 48, 48) and corner["mask"].shape == (48, 48)
    assert torch.all(corner["mask"][16:, :] == IGNORE_INDEX)
    assert torch.all(corner["image2"][:, 16:, :] == 0)
    whole = test[0]
    assert whole["image1"].shape == (10, 64, 64) and set(whole["mask"].unique().tolist()) <= {0, 1}
    stats = json.loads(cache.read_text())["bands"]
    city = root / "Onera Satellite Change Detection dataset - Images" / "test" / "imgs_1_rect"
    with Image.open(city / "B8A.tif") as tif:
        raw = np.asarray(tif, dtype=np.float64)
    expected = (raw - stats["B8A"]["mean"]) / stats["B8A"]["std"]
    actual = whole["image1"][MODEL_BANDS.index("B8A")].numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
    assert isinstance(test.plot(whole), Figure)


# -- SpaceNet 1 --------------------------------------------------------------------------------


def test_spacenet1_carves_splits_from_the_labelled_chips(no_fetch: None) -> None:
    root = shared(TORCHGEO / "spacenet" / "spacenet1")
    parts = {s: SpaceNet1(root, s) for s in ("train", "val", "test")}
    assert sum(len(ds) for ds in parts.values()) == 4
    assert all(len(ds) >= 1 for ds in parts.values())
    chosen = [i for ds in parts.values() for i in ds._indices]
    assert sorted(chosen) == [0, 1, 2, 3]
    sample = parts["train"][0]
    assert sample["image"].shape == (3, 406, 439) and sample["mask"].shape == (406, 439)
    assert float(sample["image"].min()) >= 0 and float(sample["image"].max()) <= 1
    assert set(sample["mask"].unique().tolist()) <= {0, 1}


# -- Sen1Floods11 (fake written here in the bucket's layout) -----------------------------------


def write_fake_sen1floods11(root: Path, seed: int = 0, size: int = 16) -> dict[str, list[str]]:
    """The v1.1 layout: split CSVs naming S1 chips, S2Hand (13 bands) and LabelHand GeoTIFFs."""
    rng = np.random.default_rng(seed)
    splits = {"train": ["Ghana_1", "India_2", "Spain_3"], "val": ["USA_4"], "test": ["Peru_5"]}
    csvs = {"train": "flood_train_data.csv", "val": "flood_valid_data.csv"}
    csvs["test"] = "flood_test_data.csv"
    split_dir = root / "v1.1" / "splits" / "flood_handlabeled"
    hand = root / "v1.1" / "data" / "flood_events" / "HandLabeled"
    for folder in (split_dir, hand / "S2Hand", hand / "LabelHand"):
        folder.mkdir(parents=True, exist_ok=True)
    profile = {"driver": "GTiff", "width": size, "height": size, "crs": "EPSG:4326"}
    profile["transform"] = from_origin(-1.0, 6.0, 1e-4, 1e-4)
    for split, chips in splits.items():
        rows = "".join(f"{c}_S1Hand.tif,{c}_LabelHand.tif\n" for c in chips)
        (split_dir / csvs[split]).write_text(rows)
        for chip in chips:
            image = rng.integers(100, 4000, (13, size, size)).astype(np.int16)
            image[8] = 7000 + np.arange(size)[None, :]  # B8A, recognisable
            with rasterio.open(
                hand / "S2Hand" / f"{chip}_S2Hand.tif", "w", count=13, dtype="int16", **profile
            ) as dst:
                dst.write(image)
            label = rng.integers(-1, 2, (1, size, size)).astype(np.int16)
            with rasterio.open(
                hand / "LabelHand" / f"{chip}_LabelHand.tif", "w", count=1, dtype="int16", **profile
            ) as dst:
                dst.write(label)
    return splits


def test_sen1floods11_reads_split_csvs_labels_and_band_order(
    tmp_path: Path, no_fetch: None
) -> None:
    splits = write_fake_sen1floods11(tmp_path)
    ds = Sen1Floods11(tmp_path, "train")
    assert ds.chips == splits["train"] and len(Sen1Floods11(tmp_path, "test")) == 1
    sample = ds[1]
    assert sample["image"].shape == (10, 16, 16) and ds.missing_bands == ()
    hand = tmp_path / "v1.1" / "data" / "flood_events" / "HandLabeled"
    with rasterio.open(hand / "LabelHand" / "India_2_LabelHand.tif") as src:
        label = src.read(1)
    mask = sample["mask"].numpy()
    assert np.all(mask[label == -1] == IGNORE_INDEX) and np.all(
        mask[label >= 0] == label[label >= 0]
    )
    stats = json.loads((tmp_path / "deo_band_stats.json").read_text())["bands"]
    expected = (7000 + np.arange(16) - stats["B8A"]["mean"]) / stats["B8A"]["std"]
    np.testing.assert_allclose(sample["image"][MODEL_BANDS.index("B8A"), 0].numpy(), expected, 1e-5)
    assert isinstance(ds.plot(sample), Figure)


def test_sen1floods11_download_fetches_lists_then_chips(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "bucket"
    write_fake_sen1floods11(source)
    rounds: list[list[str]] = []

    def fake_fetch(items: list[FetchItem], root: Path) -> None:
        prefix = "https://storage.googleapis.com/sen1floods11/"
        rounds.append([i.url.removeprefix(prefix) for i in items])
        for item in items:
            item.dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source / item.url.removeprefix(prefix), item.dest)

    monkeypatch.setattr(base_module, "fetch", fake_fetch)
    monkeypatch.setattr("deo.evaluation.datasets.sen1floods11.fetch", fake_fetch)
    root = tmp_path / "data"
    with pytest.raises(DataError, match="download=True"):
        Sen1Floods11(root, "val")
    assert len(Sen1Floods11(root, "val", download=True)) == 1
    assert rounds[0] == [f"v1.1/splits/flood_handlabeled/flood_{s}_data.csv" for s in (
        "train", "valid", "test")]  # fmt: skip
    assert "v1.1/data/flood_events/HandLabeled/S2Hand/USA_4_S2Hand.tif" in rounds[1]
    assert "v1.1/data/flood_events/HandLabeled/LabelHand/Peru_5_LabelHand.tif" in rounds[1]
    assert len(rounds[1]) == 3 + 2 * 5


# -- PASTIS (fake written here in torchgeo's PASTIS-R layout) ----------------------------------


def write_fake_pastis(root: Path, seed: int = 0, size: int = 8, steps: int = 3) -> None:
    """``PASTIS-R/metadata.geojson`` + S2 time series and semantic targets as .npy files."""
    rng = np.random.default_rng(seed)
    base = root / "PASTIS-R"
    for sub in ("DATA_S2", "ANNOTATIONS"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    features = []
    for patch in range(10):
        pid, fold = 10000 + patch, patch % 5 + 1
        box = [[0, 0], [0, 1], [1, 1], [1, 0], [0, 0]]
        features.append(
            {
                "type": "Feature",
                "properties": {"ID_PATCH": pid, "Fold": fold},
                "geometry": {"type": "Polygon", "coordinates": [box]},
            }
        )
        series = rng.integers(200, 3000, (steps, 10, size, size)).astype(np.int16)
        np.save(base / "DATA_S2" / f"S2_{pid}.npy", series)
        target = rng.integers(0, 20, (3, size, size)).astype(np.uint8)
        np.save(base / "ANNOTATIONS" / f"TARGET_{pid}.npy", target)
    geojson = {"type": "FeatureCollection", "features": features}
    (base / "metadata.geojson").write_text(json.dumps(geojson))


def test_pastis_folds_temporal_median_and_void_class(tmp_path: Path, no_fetch: None) -> None:
    write_fake_pastis(tmp_path)
    parts = {s: PASTIS(tmp_path, s) for s in ("train", "val", "test")}
    assert [len(parts[s]) for s in ("train", "val", "test")] == [6, 2, 2]
    sample = parts["val"][0]
    assert sample["image"].shape == (10, 8, 8) and sample["mask"].dtype == torch.int64
    pid = parts["val"]._source.idxs[0]
    series = np.load(tmp_path / "PASTIS-R" / "DATA_S2" / f"S2_{pid}.npy").astype(np.float64)
    target = np.load(tmp_path / "PASTIS-R" / "ANNOTATIONS" / f"TARGET_{pid}.npy")[0]
    stats = json.loads((tmp_path / "deo_band_stats.json").read_text())["bands"]
    median = np.median(series, axis=0)
    expected = (median[7] - stats["B8A"]["mean"]) / stats["B8A"]["std"]
    actual = sample["image"][MODEL_BANDS.index("B8A")].numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
    mask = sample["mask"].numpy()
    assert np.all(mask[target == 19] == IGNORE_INDEX)
    assert np.all(mask[target < 19] == target[target < 19])


# -- splits, partitions, registry --------------------------------------------------------------


def test_hash_split_and_low_label_subsets_are_stable_and_disjoint() -> None:
    ids = [f"chip{i}" for i in range(50)]
    parts = hash_split(ids, {"train": 0.7, "val": 0.1, "test": 0.2}, salt="x")
    assert [len(parts[k]) for k in ("train", "val", "test")] == [35, 5, 10]
    assert sorted(i for part in parts.values() for i in part) == sorted(ids)
    assert hash_split(list(reversed(ids)), {"train": 0.7, "val": 0.1, "test": 0.2}, "x")[
        "val"
    ] == list(reversed(parts["val"]))
    tenth = low_label_subset(ids, "train", "0.10x_train", salt="x")
    assert len(tenth) == 5 and set(tenth) <= set(ids)
    assert low_label_subset(ids, "test", "0.10x_train", salt="x") == ids
    with pytest.raises(ValueError, match="partition"):
        low_label_subset(ids, "train", "tenth", salt="x")


def test_registry_covers_the_papers_benchmarks_and_names_unknown_ones() -> None:
    table = pd.read_csv(Path(__file__).parents[1] / "config" / "paper_results.csv")
    assert set(table["benchmark"]) == set(registry.BENCHMARKS)
    for row in table.drop_duplicates("benchmark").itertuples():
        spec = registry.get_benchmark(row.benchmark)
        assert (spec.group, spec.metric) == (row.group, row.metric)
    with pytest.raises(ConfigError, match="m-eurosat"):
        registry.get_benchmark("eurosat")


def test_registry_make_reads_shared_levircd(no_fetch: None) -> None:
    spec = registry.get_benchmark("LEVIR-CD")
    ds = spec.make(shared(TORCHGEO / "levircd" / "levircd"), "test")
    assert (ds.task, ds.modality, len(ds)) == ("change", "rgb", 2)
