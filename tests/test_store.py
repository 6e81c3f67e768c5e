"""Shard stores, their merge into the final store, and the readers (checked with plain zarr)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

import deo.data.store as store_mod
from deo.data.bands import BY_NAME, MS_BANDS
from deo.data.store import (
    ShardReader,
    ShardWriter,
    merge_shards,
    open_store,
    read_shard_table,
    store_bands,
)
from deo.errors import DataError

T = 8


def sample(i: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct, recognisable content for sample i (its value encodes i)."""
    rng = np.random.default_rng(i)
    s2 = rng.integers(1, 5000, (10, T, T), dtype=np.uint16)
    s2[0, 0, 0] = i
    rgb = rng.integers(0, 256, (3, T, T), dtype=np.uint8)
    return s2, rgb


def write_shards(root: Path, orders: list[list[int]], with_rgb: bool = True) -> list[Path]:
    """One shard store per list of global orders, written in the order given."""
    paths = []
    for j, shard_orders in enumerate(orders):
        path = root / f"shard{j}"
        with ShardWriter(path, len(shard_orders), T, with_rgb) as writer:
            for pos, order in enumerate(shard_orders):
                s2, rgb = sample(order)
                meta = {"key": f"k{order}", "order": order, "split": "train", "shard": j}
                writer.write(pos, s2, rgb if with_rgb else None, meta)
        paths.append(path)
    return paths


def merge(root: Path, shards: list[Path], sps: int = 4, **kw) -> int:
    return merge_shards(
        shards,
        root / "out.zarr",
        root / "out.parquet",
        samples_per_shard=sps,
        clevel=3,
        attrs={"config_digest": "abc123"},
        **kw,
    )


def test_round_trip_with_plain_zarr(tmp_path: Path) -> None:
    # three shards written in interleaved global order
    orders = [[0, 3, 6, 9, 12], [1, 4, 7, 10], [2, 5, 8, 11]]
    n = merge(tmp_path, write_shards(tmp_path, orders), gsd_m=10.0)
    assert n == 13

    group = zarr.open_group(tmp_path / "out.zarr", mode="r", zarr_format=3)
    s2, rgb = group["s2"], group["rgb"]
    assert (s2.dtype, s2.shape) == (np.dtype("uint16"), (13, 10, T, T))
    assert (rgb.dtype, rgb.shape) == (np.dtype("uint8"), (13, 3, T, T))
    assert s2.chunks == (1, 10, T, T) and s2.shards == (4, 10, T, T)
    assert rgb.chunks == (1, 3, T, T) and rgb.shards == (4, 3, T, T)
    for array in (s2, rgb):
        (codec,) = array.metadata.to_dict()["codecs"]
        assert codec["name"] == "sharding_indexed"
        blosc = [c for c in codec["configuration"]["codecs"] if c["name"] == "blosc"]
        assert len(blosc) == 1
        assert blosc[0]["configuration"]["cname"] == "zstd"
        assert blosc[0]["configuration"]["shuffle"] == "bitshuffle"
        assert blosc[0]["configuration"]["clevel"] == 3

    # every sample sits at the row of its global order
    for i in range(13):
        want_s2, want_rgb = sample(i)
        np.testing.assert_array_equal(s2[i], want_s2)
        np.testing.assert_array_equal(rgb[i], want_rgb)

    attrs = dict(group.attrs)
    assert attrs["bands"] == list(MS_BANDS)
    assert attrs["wavelengths_nm"] == [BY_NAME[b].wavelength_nm for b in MS_BANDS]
    assert attrs["tile_size"] == T and attrs["gsd_m"] == 10.0
    assert attrs["config_digest"] == "abc123"

    table = pd.read_parquet(tmp_path / "out.parquet")
    assert table["key"].tolist() == [f"k{i}" for i in range(13)]
    assert table["index"].tolist() == list(range(13))
    assert set(table.columns) == {"key", "order", "split", "shard", "index"}
    assert table.loc[table["key"] == "k4", "shard"].item() == 1


def test_store_helpers(tmp_path: Path) -> None:
    merge(tmp_path, write_shards(tmp_path, [[0, 1, 2]], with_rgb=False))
    group = open_store(tmp_path / "out.zarr")
    assert store_bands(group) == MS_BANDS
    assert "rgb" not in group.array_keys()


def test_resume_skips_flushed_keys_and_merge_has_each_once(tmp_path: Path) -> None:
    path = tmp_path / "shard0"
    writer = ShardWriter(path, 6, T, True, flush_every=2)
    for pos in range(5):
        s2, rgb = sample(pos)
        writer.write(pos, s2, rgb, {"key": f"k{pos}", "order": pos})
    del writer  # killed: the 5th write was never flushed

    resumed = ShardWriter(path, 6, T, True)
    assert resumed.done_keys == {"k0", "k1", "k2", "k3"}
    for pos in range(6):
        if f"k{pos}" in resumed.done_keys:
            continue
        s2, rgb = sample(pos)
        resumed.write(pos, s2, rgb, {"key": f"k{pos}", "order": pos})
    resumed.close()
    assert sorted(read_shard_table(path)["key"]) == [f"k{i}" for i in range(6)]

    merge(tmp_path, [path])
    table = pd.read_parquet(tmp_path / "out.parquet")
    assert table["key"].tolist() == [f"k{i}" for i in range(6)]
    s2 = zarr.open_array(tmp_path / "out.zarr" / "s2", mode="r")
    np.testing.assert_array_equal(s2[4], sample(4)[0])


def test_resume_with_other_parameters_starts_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with ShardWriter(tmp_path / "s", 4, T, True) as w:
        w.write(0, *sample(0), {"key": "a", "order": 0})
    with caplog.at_level("WARNING", logger="deo.data.store"):
        again = ShardWriter(tmp_path / "s", 4, T * 2, True)
    assert again.done_keys == set() and "other settings" in caplog.text


@pytest.mark.parametrize(
    ("s2", "rgb", "match"),
    [
        (np.zeros((10, T, T + 1), np.uint16), np.zeros((3, T, T), np.uint8), r"\(10, 8, 8\)"),
        (np.zeros((10, T, T), np.int32), np.zeros((3, T, T), np.uint8), "uint16"),
        (np.zeros((10, T, T), np.uint16), np.zeros((3, T, T), np.float32), "uint8"),
        (np.zeros((10, T, T), np.uint16), None, "rgb must be"),
    ],
)
def test_write_validates_arrays(tmp_path: Path, s2, rgb, match: str) -> None:
    writer = ShardWriter(tmp_path / "s", 2, T, True)
    with pytest.raises(ValueError, match=match):
        writer.write(0, s2, rgb, {"key": "a", "order": 0})


def test_write_validates_meta_and_positions(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path / "s", 2, T, False)
    s2 = sample(0)[0]
    with pytest.raises(TypeError, match="key"):
        writer.write(0, s2, None, {"order": 0})
    with pytest.raises(ValueError, match="outside"):
        writer.write(2, s2, None, {"key": "a", "order": 0})
    writer.write(0, s2, None, {"key": "a", "order": 0})
    with pytest.raises(ValueError, match="already holds"):
        writer.write(0, s2, None, {"key": "b", "order": 1})
    with pytest.raises(ValueError, match="already written"):
        writer.write(1, s2, None, {"key": "a", "order": 0})


def test_duplicate_keys_name_the_shard(tmp_path: Path) -> None:
    shards = write_shards(tmp_path, [[0, 1], [2, 1]])
    with pytest.raises(DataError, match="duplicate sample key 'k1'") as err:
        merge(tmp_path, shards)
    assert err.value.path == str(shards[1])


def test_mismatched_shards_name_the_shard(tmp_path: Path) -> None:
    good = write_shards(tmp_path, [[0]])[0]
    no_rgb = tmp_path / "no_rgb"
    with ShardWriter(no_rgb, 1, T, False) as w:
        w.write(0, sample(1)[0], None, {"key": "k1", "order": 1})
    with pytest.raises(DataError, match="rgb_tile_size=None") as err:
        merge(tmp_path, [good, no_rgb])
    assert err.value.path == str(no_rgb)

    big = tmp_path / "big"
    with ShardWriter(big, 1, T * 2, True) as w:
        w.write(
            0,
            np.ones((10, 2 * T, 2 * T), np.uint16),
            np.ones((3, 2 * T, 2 * T), np.uint8),
            {"key": "k2", "order": 2},
        )
    with pytest.raises(DataError, match="tile_size=16") as err:
        merge(tmp_path, [good, big])
    assert err.value.path == str(big)


def _shards_with_rgb_size(root: Path, orders: list[list[int]], r: int) -> list[Path]:
    """Shard stores whose ``rgb`` is ``r`` pixels a side (its content encodes the order)."""
    paths = []
    for j, shard_orders in enumerate(orders):
        path = root / f"rgb{r}_{j}"
        with ShardWriter(path, len(shard_orders), T, True, rgb_tile_size=r) as writer:
            for pos, order in enumerate(shard_orders):
                rgb = np.full((3, r, r), order, np.uint8)
                writer.write(pos, sample(order)[0], rgb, {"key": f"k{order}", "order": order})
        paths.append(path)
    return paths


def test_shuffled_threaded_merge_permutes_rows_and_keeps_keys(tmp_path: Path) -> None:
    orders = [[0, 3, 6, 9, 12], [1, 4, 7, 10], [2, 5, 8, 11]]
    shards = _shards_with_rgb_size(tmp_path, orders, 12)
    assert merge(tmp_path, shards, shuffle_seed=7, threads=3) == 13
    permutation = np.random.default_rng(7).permutation(13)  # row i holds sorted sample perm[i]
    assert sorted(permutation.tolist()) == list(range(13)) and permutation.tolist() != sorted(
        permutation.tolist()
    )
    group = zarr.open_group(tmp_path / "out.zarr", mode="r", zarr_format=3)
    assert group["rgb"].shape == (13, 3, 12, 12) and group.attrs["rgb_tile_size"] == 12
    table = pd.read_parquet(tmp_path / "out.parquet")
    assert table["key"].tolist() == [f"k{i}" for i in permutation]
    assert table["order"].tolist() == permutation.tolist()
    assert table["index"].tolist() == list(range(13))
    s2, rgb = group["s2"][:], group["rgb"][:]
    for row, i in enumerate(permutation):
        np.testing.assert_array_equal(s2[row], sample(int(i))[0])
        assert np.all(rgb[row] == i)

    # one thread writes the same store
    one = tmp_path / "one"
    one.mkdir()
    merge(one, shards, shuffle_seed=7, threads=1)
    again = zarr.open_group(one / "out.zarr", mode="r", zarr_format=3)
    np.testing.assert_array_equal(again["s2"][:], s2)
    np.testing.assert_array_equal(again["rgb"][:], rgb)
    pd.testing.assert_frame_equal(pd.read_parquet(one / "out.parquet"), table)

    other = _shards_with_rgb_size(tmp_path, [[13]], 16)
    with pytest.raises(DataError, match="rgb_tile_size=16") as err:
        merge(tmp_path, [shards[0], other[0]])
    assert err.value.path == str(other[0])


def test_no_samples_is_an_error(tmp_path: Path) -> None:
    ShardWriter(tmp_path / "empty", 3, T, True).close()
    with pytest.raises(DataError, match="no samples"):
        merge(tmp_path, [tmp_path / "empty"])
    with pytest.raises(DataError, match="no samples"):
        merge(tmp_path, [])


def test_killed_merge_leaves_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shards = write_shards(tmp_path, [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]])
    real_gather, calls = store_mod._gather, []

    def dying_gather(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt("killed")
        return real_gather(*args, **kwargs)

    monkeypatch.setattr(store_mod, "_gather", dying_gather)
    with pytest.raises(KeyboardInterrupt):
        merge(tmp_path, shards)
    assert not (tmp_path / "out.zarr").exists()
    assert not (tmp_path / "out.parquet").exists()

    monkeypatch.setattr(store_mod, "_gather", real_gather)
    assert merge(tmp_path, shards) == 10
    assert not (tmp_path / "out.zarr.tmp").exists()
    assert zarr.open_array(tmp_path / "out.zarr" / "s2", mode="r").shape[0] == 10


def test_provenance_may_not_shadow_store_attrs(tmp_path: Path) -> None:
    shards = write_shards(tmp_path, [[0]])
    with pytest.raises(ValueError, match="tile_size"):
        merge_shards(
            shards,
            tmp_path / "o.zarr",
            tmp_path / "o.parquet",
            samples_per_shard=2,
            clevel=1,
            attrs={"tile_size": 3},
        )


def test_open_store_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such pre-training store") as err:
        open_store(tmp_path / "absent.zarr")
    assert "absent.zarr" in str(err.value)
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not a Zarr v3 group"):
        open_store(tmp_path / "plain")
    zarr.open_group(tmp_path / "other.zarr", mode="w", zarr_format=3)
    with pytest.raises(DataError, match="'s2' array is missing"):
        open_store(tmp_path / "other.zarr")


def test_shard_reader_matches_zarr(tmp_path: Path) -> None:
    merge(tmp_path, write_shards(tmp_path, [list(range(0, 11)), list(range(11, 18))]), sps=4)
    group = open_store(tmp_path / "out.zarr")
    rows = np.array([17, 3, 3, 0, 9, 16, 5, 12])  # unsorted, duplicated, last partial shard
    for name in ("s2", "rgb"):
        got = ShardReader(group[name]).read(rows)
        want = np.stack([group[name][int(r)] for r in rows])
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    with pytest.raises(IndexError):
        ShardReader(group["s2"]).read(np.array([18]))


def test_shard_reader_detects_a_corrupt_shard(tmp_path: Path) -> None:
    merge(tmp_path, write_shards(tmp_path, [[0, 1, 2, 3, 4]]), sps=4)
    shard_file = tmp_path / "out.zarr" / "s2" / "c" / "0" / "0" / "0" / "0"
    data = bytearray(shard_file.read_bytes())
    data[-10] ^= 0xFF  # flip bits in the shard index
    shard_file.write_bytes(bytes(data))
    with pytest.raises(DataError, match="checksum") as err:
        ShardReader(open_store(tmp_path / "out.zarr")["s2"]).read(np.array([1]))
    assert str(shard_file) in str(err.value)


def test_shard_reader_refuses_other_layouts(tmp_path: Path) -> None:
    group = zarr.open_group(tmp_path / "x.zarr", mode="w", zarr_format=3)
    array = group.create_array("s2", shape=(4, 10, T, T), dtype="uint16", chunks=(1, 10, T, T))
    with pytest.raises(DataError, match="layout"):
        ShardReader(array)
