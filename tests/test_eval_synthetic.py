"""The demo benchmarks: deterministic, in the formats the real readers read, and learnable."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from deo.evaluation.datasets.geobench import GEOBENCH_S2
from deo.evaluation.datasets.pickle_literals import read_repr_literals
from deo.evaluation.registry import DEMO_BENCHMARKS, get_benchmark
from deo.evaluation.synthetic import DemoSizes, write_demo_benchmarks

pytestmark = pytest.mark.timeout(120)

SIZES = DemoSizes()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_demo_benchmarks(tmp_path_factory.mktemp("demo"), seed=3, sizes=SIZES)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path) -> None:
    small = DemoSizes(train=4, val=2, test=2, tile=16)
    first = write_demo_benchmarks(tmp_path / "a", seed=7, sizes=small)
    write_demo_benchmarks(tmp_path / "b", seed=7, sizes=small)
    write_demo_benchmarks(tmp_path / "c", seed=8, sizes=small)
    assert set(first) == set(DEMO_BENCHMARKS)
    a, b, c = (_files(tmp_path / x) for x in "abc")
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_demo_benchmarks_are_read_by_the_registry_readers(demo: dict[str, Path]) -> None:
    for name, spec in DEMO_BENCHMARKS.items():
        assert get_benchmark(name) is spec
        for split, n in SIZES.splits().items():
            ds = spec.make(demo[name], split)
            assert len(ds) == n and (ds.task, ds.modality) == (spec.task, spec.modality)
        sample = ds[0]
        assert isinstance(ds.plot(sample), Figure)
        channels = 10 if spec.modality == "ms" else 3
        for key in ("image", "image1", "image2"):
            if key in sample:
                assert sample[key].shape == (channels, SIZES.tile, SIZES.tile)
                assert sample[key].dtype == torch.float32
        if spec.task == "classification":
            assert sample["label"].dtype == torch.int64 and sample["label"].ndim == 0
        else:
            assert sample["mask"].dtype == torch.int64
            assert int(sample["mask"].max()) < spec.num_classes


def test_geobench_demo_files_look_like_geobench(demo: dict[str, Path]) -> None:
    root = demo["demo-classification"]
    partition = json.loads((root / "default_partition.json").read_text())
    assert set(partition) == {"train", "valid", "test"}
    stats = json.loads((root / "band_stats.json").read_text())
    with h5py.File(root / f"{partition['valid'][0]}.hdf5", "r") as f:
        assert set(f.keys()) <= set(GEOBENCH_S2) and len(f.keys()) == 12
        assert set(f.keys()) <= set(stats)
        attrs = read_repr_literals(f.attrs["pickle"])
    assert isinstance(attrs["label"], int) and 0 <= attrs["label"] < 4
    seg = demo["demo-segmentation"]
    with h5py.File(next(seg.glob("*.hdf5")), "r") as f:
        assert f["label"].shape == (SIZES.tile, SIZES.tile)
    half = get_benchmark("demo-classification").make(root, "train", partition="0.50x_train")
    assert len(half) == SIZES.train // 2


def _nearest_centroid(train: torch.Tensor, y: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    centroids = torch.stack([train[y == k].mean(0) for k in y.unique()])
    return y.unique()[torch.cdist(test, centroids).argmin(1)]


def test_classes_are_separable_from_raw_pixels(demo: dict[str, Path]) -> None:
    spec = get_benchmark("demo-classification")
    feats = {}
    for split in ("train", "test"):
        ds = spec.make(demo[spec.name], split)
        samples = [ds[i] for i in range(len(ds))]
        x = torch.stack([s["image"].mean((1, 2)) for s in samples])  # mean raw spectrum
        feats[split] = (x, torch.stack([s["label"] for s in samples]))
    accuracy = (_nearest_centroid(*feats["train"], feats["test"][0]) == feats["test"][1]).float()
    assert accuracy.mean() >= 0.25 + 0.3  # four balanced classes: chance is 0.25

    spec = get_benchmark("demo-segmentation")
    pixels = {}
    for split in ("train", "test"):
        ds = spec.make(demo[spec.name], split)
        samples = [ds[i] for i in range(len(ds))]
        x = torch.cat([s["image"].flatten(1).T for s in samples])
        pixels[split] = (x, torch.cat([s["mask"].flatten() for s in samples]))
    accuracy = (_nearest_centroid(*pixels["train"], pixels["test"][0]) == pixels["test"][1]).float()
    assert accuracy.mean() >= 0.25 + 0.3

    ds = get_benchmark("demo-change").make(demo["demo-change"], "test")
    diff = torch.cat(
        [(ds[i]["image2"] - ds[i]["image1"]).abs().sum(0).flatten() for i in range(len(ds))]
    )
    mask = torch.cat([ds[i]["mask"].flatten() for i in range(len(ds))])
    assert 0 < mask.float().mean() < 0.5
    predicted = diff > 0.4
    tp = (predicted & (mask == 1)).sum()
    f1 = 2 * tp / (predicted.sum() + (mask == 1).sum())
    assert f1 >= 0.5


def test_demo_images_are_not_constant_and_have_no_nodata(demo: dict[str, Path]) -> None:
    root = demo["demo-segmentation"]
    with h5py.File(sorted(root.glob("*.hdf5"))[0], "r") as f:
        for name in f:
            if name != "label":
                layer = np.asarray(f[name])
                assert layer.min() > 0 and layer.std() > 0
