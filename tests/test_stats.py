"""Streaming per-band statistics against numpy on the whole array (an independent reference)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from deo.data.bands import MS_BANDS
from deo.data.model_input import OPTICAL, OPTICAL_S2
from deo.data.stats import band_stats, read_stats, write_stats
from deo.data.store import ShardWriter, merge_shards
from deo.errors import DataError

T = 6


def build(root: Path, s2: np.ndarray, rgb: np.ndarray | None, splits: list[str]) -> Path:
    """A final store holding exactly these arrays, in this order, with a split per sample."""
    with ShardWriter(root / "shard", len(s2), T, rgb is not None) as writer:
        for i in range(len(s2)):
            meta = {"key": f"k{i}", "order": i, "split": splits[i], "has_rgb": i % 3 != 0}
            writer.write(i, s2[i], None if rgb is None else rgb[i], meta)
    merge_shards(
        [root / "shard"],
        root / "s.zarr",
        root / "s.parquet",
        samples_per_shard=8,
        clevel=1,
        attrs={},
    )
    return root / "s.zarr"


def reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-channel mean, population std and count of the non-zero values, in float64."""
    means, stds, counts = [], [], []
    for c in range(x.shape[1]):
        v = x[:, c].astype(np.float64)
        v = v[v != 0]
        means.append(v.mean())
        stds.append(v.std())
        counts.append(v.size)
    return np.array(means), np.array(stds), np.array(counts)


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(7)
    n = 23
    s2 = rng.integers(1, 12000, (n, 10, T, T), dtype=np.uint16)
    s2[rng.random(s2.shape) < 0.2] = 0  # nodata pixels, excluded from the statistics
    s2[3] = 0  # a fully padded sample
    rgb = rng.integers(0, 256, (n, 3, T, T), dtype=np.uint8)
    splits = ["train" if i % 4 else "val" for i in range(n)]
    return s2, rgb, splits


@pytest.mark.parametrize("block", [1, 5, 64])
def test_matches_numpy_on_train_split(tmp_path: Path, data, block: int) -> None:
    s2, rgb, splits = data
    store = build(tmp_path, s2, rgb, splits)
    table = pd.read_parquet(tmp_path / "s.parquet")
    stats = band_stats(store, table, split="train", block=block)

    train = np.array([s == "train" for s in splits])
    for arr, names in ((s2, MS_BANDS), (rgb, ("R", "G", "B"))):
        mean, std, count = reference(arr[train])
        for i, band in enumerate(names):
            assert stats[band]["count"] == count[i]
            assert stats[band]["mean"] == pytest.approx(mean[i], rel=1e-9)
            assert stats[band]["std"] == pytest.approx(std[i], rel=1e-9)
    assert set(stats) == set(MS_BANDS) | {"R", "G", "B"} | set(OPTICAL) | set(OPTICAL_S2)


def test_optical_statistics_are_of_the_max_scaled_model_input(tmp_path: Path, data) -> None:
    """Per sample: the partner where the table says so (else B04, B03, B02), over its maximum."""
    s2, rgb, splits = data
    store = build(tmp_path, s2, rgb, splits)
    table = pd.read_parquet(tmp_path / "s.parquet")
    stats = band_stats(store, table, split="train", block=5)
    mixed, own = [], []
    for i in range(len(s2)):
        if splits[i] != "train":
            continue
        s2_rgb = np.stack([s2[i, 2], s2[i, 1], s2[i, 0]]).astype(np.float64)  # B04 B03 B02
        s2_rgb = s2_rgb / s2_rgb.max() if s2_rgb.max() > 0 else s2_rgb
        partner = rgb[i].astype(np.float64) / rgb[i].max()
        own.append(s2_rgb)
        mixed.append(partner if i % 3 != 0 else s2_rgb)
    for keys, arrays in ((OPTICAL, mixed), (OPTICAL_S2, own)):
        mean, std, count = reference(np.stack(arrays))
        for c, key in enumerate(keys):
            assert stats[key]["count"] == count[c]
            assert stats[key]["mean"] == pytest.approx(mean[c], rel=1e-9)
            assert stats[key]["std"] == pytest.approx(std[c], rel=1e-9)
    assert stats["optical_R"]["mean"] != pytest.approx(stats["optical_s2_R"]["mean"], rel=1e-3)
    without = table.drop(columns="has_rgb")
    with pytest.raises(DataError, match="has_rgb"):
        band_stats(store, without, split="train")


def test_all_samples_and_no_rgb(tmp_path: Path, data) -> None:
    s2, _, splits = data
    store = build(tmp_path, s2, None, splits)
    stats = band_stats(store, split=None, block=4)
    mean, std, _ = reference(s2)
    assert set(stats) == set(MS_BANDS) | set(OPTICAL) | set(OPTICAL_S2)
    assert [stats[b]["mean"] for b in MS_BANDS] == pytest.approx(mean, rel=1e-9)
    assert [stats[b]["std"] for b in MS_BANDS] == pytest.approx(std, rel=1e-9)
    assert band_stats(store, split=None, block=4, threads=3) == stats  # merged in block order


def test_stable_for_large_values_with_small_spread(tmp_path: Path) -> None:
    """A running sum of squares loses ~1e-6 here; Chan's merge of M2 keeps 1e-9."""
    rng = np.random.default_rng(1)
    s2 = (60000 + rng.integers(-3, 4, (40, 10, T, T))).astype(np.uint16)
    store = build(tmp_path, s2, None, ["train"] * 40)
    stats = band_stats(store, split=None, block=3)
    mean, std, _ = reference(s2)
    assert [stats[b]["std"] for b in MS_BANDS] == pytest.approx(std, rel=1e-9)
    assert [stats[b]["mean"] for b in MS_BANDS] == pytest.approx(mean, rel=1e-12)


def test_band_without_valid_pixels_is_an_error(tmp_path: Path, data) -> None:
    s2, _, splits = data
    s2 = s2.copy()
    s2[:, 4] = 0
    store = build(tmp_path, s2, None, splits)
    with pytest.raises(DataError, match="B06"):
        band_stats(store, split=None)


def test_split_needs_the_table(tmp_path: Path, data) -> None:
    s2, _, splits = data
    store = build(tmp_path, s2, None, splits)
    with pytest.raises(ValueError, match="table"):
        band_stats(store, split="train")
    table = pd.read_parquet(tmp_path / "s.parquet")
    with pytest.raises(DataError, match="no samples in split 'test'"):
        band_stats(store, table, split="test")


def test_write_and_read_stats(tmp_path: Path, data) -> None:
    s2, rgb, splits = data
    store = build(tmp_path, s2, rgb, splits)
    with pytest.raises(DataError, match="stats stage has not run"):
        read_stats(store)
    stats = band_stats(store, pd.read_parquet(tmp_path / "s.parquet"), split=None)
    write_stats(store, stats, tmp_path / "out" / "stats.json")
    assert zarr.open_group(store, mode="r").attrs["stats"] == stats
    assert json.loads((tmp_path / "out" / "stats.json").read_text()) == stats
    assert read_stats(store) == stats
