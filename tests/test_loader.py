"""The training dataset (raw values, partner flags, batched reads) and the shard-grouped sampler."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from deo.data.loader import PretrainDataset, ShardGroupedSampler, make_loader
from deo.data.store import ShardWriter, merge_shards, shuffled_rows
from deo.errors import DataError

T = 8
N = 30
SPS = 8


@pytest.fixture(scope="module")
def raw() -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(3)
    s2 = rng.integers(0, 4000, (N, 10, T, T), dtype=np.uint16)
    rgb = rng.integers(0, 256, (N, 3, T, T), dtype=np.uint8)
    splits = ["val" if i % 5 == 0 else "train" for i in range(N)]
    return s2, rgb, splits


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, raw) -> Path:
    s2, rgb, splits = raw
    root = tmp_path_factory.mktemp("loader")
    halves = (range(0, N, 2), range(1, N, 2))
    for j, half in enumerate(halves):
        with ShardWriter(root / f"shard{j}", len(half), T, True) as writer:
            for pos, i in enumerate(half):
                meta = {"key": f"k{i}", "order": i, "split": splits[i], "has_rgb": i % 3 != 1}
                writer.write(pos, s2[i], rgb[i], meta)
    merge_shards(
        [root / "shard0", root / "shard1"],
        root / "p.zarr",
        root / "p.parquet",
        samples_per_shard=SPS,
        clevel=1,
        attrs={},
    )
    return root / "p.zarr"


def test_items_are_the_stored_values(store: Path, raw) -> None:
    """Raw DN and 8-bit partners, and the table's partner flag: normalising is the views' job."""
    s2, rgb, _ = raw
    table = store.with_suffix(".parquet")
    ds = PretrainDataset(store, table, with_rgb=True)
    assert len(ds) == N
    for i in (0, 7, 29):
        item = ds[i]
        assert item["s2"].dtype == torch.uint16 and item["s2"].shape == (10, T, T)
        assert np.array_equal(item["s2"].numpy(), s2[i])
        assert item["rgb"].dtype == torch.uint8 and np.array_equal(item["rgb"].numpy(), rgb[i])
        assert item["has_rgb"].dtype == torch.bool and bool(item["has_rgb"]) == (i % 3 != 1)
        assert item["index"].dtype == torch.int64 and item["index"].item() == i
    assert set(PretrainDataset(store)[4]) == {"s2", "index"}


def test_partner_flags_need_the_table(store: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="table"):
        PretrainDataset(store, with_rgb=True)
    table = pd.read_parquet(store.with_suffix(".parquet")).drop(columns="has_rgb")
    table.to_parquet(tmp_path / "old.parquet")
    with pytest.raises(DataError, match="has_rgb"):
        PretrainDataset(store, tmp_path / "old.parquet", with_rgb=True)


def test_split_selects_rows(store: Path, raw) -> None:
    table = store.with_suffix(".parquet")
    ds = PretrainDataset(store, table=table, split="val")
    rows = pd.read_parquet(table).query("split == 'val'")["index"].tolist()
    assert rows == [i for i in range(N) if raw[2][i] == "val"]
    assert [ds[j]["index"].item() for j in range(len(ds))] == rows
    assert np.array_equal(ds[1]["s2"].numpy(), raw[0][rows[1]])
    with pytest.raises(ValueError, match="table"):
        PretrainDataset(store, split="val")


def test_getitems_equals_getitem(store: Path) -> None:
    ds = PretrainDataset(store, store.with_suffix(".parquet"), with_rgb=True)
    indices = [17, 2, 29, 2, 8, 9, 0, 23]  # across shards, unsorted, with a repeat
    batch = ds.__getitems__(indices)
    assert [b["index"].item() for b in batch] == indices
    for i, got in zip(indices, batch, strict=True):
        want = ds[i]
        for key in ("s2", "rgb", "has_rgb", "index"):
            assert torch.equal(got[key], want[key])


def test_dataset_survives_pickling(store: Path) -> None:
    ds = PretrainDataset(store, store.with_suffix(".parquet"), with_rgb=True)
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[5]["s2"], ds[5]["s2"])


def flat(batches: list[list[int]]) -> list[int]:
    return [i for b in batches for i in b]


SHARD_IDS = np.arange(50) // 8  # 7 shards, the last one partial


def test_sampler_is_deterministic_and_reshuffles() -> None:
    a = ShardGroupedSampler(SHARD_IDS, 4, seed=1)
    b = ShardGroupedSampler(SHARD_IDS, 4, seed=1)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert list(ShardGroupedSampler(SHARD_IDS, 4, seed=2)) != first
    assert len(first) == len(a) == 50 // 4
    assert all(len(batch) == 4 for batch in first)
    assert len(set(flat(first))) == 48


def test_sampler_keeps_shards_together_and_shuffles_inside() -> None:
    sampler = ShardGroupedSampler(SHARD_IDS, 4, seed=0)
    shard_orders, inside_shard0 = set(), set()
    for epoch in range(4):
        order = sampler.epoch_order(epoch)
        assert sorted(order.tolist()) == list(range(50))
        visits = SHARD_IDS[order]
        runs = visits[np.r_[True, np.diff(visits) != 0]].tolist()
        assert sorted(runs) == list(range(7))  # each shard's items are served together
        shard_orders.add(tuple(runs))
        inside_shard0.add(tuple(order[visits == 0].tolist()))
    assert len(shard_orders) > 1 and len(inside_shard0) > 1


def test_sampler_partitions_for_ddp() -> None:
    ids = np.arange(48) // 8
    ranks = [ShardGroupedSampler(ids, 4, seed=5, rank=r, world_size=3) for r in range(3)]
    for sampler in ranks:
        sampler.set_epoch(2)
    batches = [list(s) for s in ranks]
    assert len({len(b) for b in batches}) == 1 and len(batches[0]) == len(ranks[0]) == 4
    seen = [flat(b) for b in batches]
    assert sorted(seen[0] + seen[1] + seen[2]) == list(range(48))  # disjoint and covering

    # without drop_last every item is served; ranks still get equally many batches
    loose = [
        list(ShardGroupedSampler(SHARD_IDS, 4, seed=5, rank=r, world_size=3, drop_last=False))
        for r in range(3)
    ]
    assert len({len(b) for b in loose}) == 1
    assert set(flat(loose[0]) + flat(loose[1]) + flat(loose[2])) == set(range(50))


def test_sampler_resumes_mid_epoch() -> None:
    sampler = ShardGroupedSampler(SHARD_IDS, 4, seed=3)
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.set_epoch(4)
    sampler.set_position(5)
    assert list(sampler) == full[5:]
    assert list(sampler) == full  # the skip applies to one iteration only
    assert len(sampler) == len(full)
    with pytest.raises(ValueError, match="batches_done"):
        sampler.set_position(len(full) + 1)


def test_loader_with_workers_matches_in_process(store: Path) -> None:
    ds = PretrainDataset(store, store.with_suffix(".parquet"), with_rgb=True)
    serial = make_loader(ds, 4, workers=0, seed=11)
    parallel = make_loader(ds, 4, workers=2, seed=11)
    for loader in (serial, parallel):
        loader.batch_sampler.set_epoch(1)
    got_serial, got_parallel = list(serial), list(parallel)
    assert len(got_serial) == len(got_parallel) == N // 4
    for a, b in zip(got_serial, got_parallel, strict=True):
        assert a["s2"].shape == (4, 10, T, T) and a["rgb"].shape == (4, 3, T, T)
        for key in ("s2", "rgb", "has_rgb", "index"):
            assert torch.equal(a[key], b[key])
    indices = torch.cat([b["index"] for b in got_parallel]).tolist()
    assert len(set(indices)) == len(indices) == (N // 4) * 4
    first = got_parallel[0]
    np.testing.assert_allclose(
        first["s2"][0].numpy(), ds[int(first["index"][0])]["s2"].numpy(), rtol=0, atol=0
    )


def fmow_like_categories(n_categories: int, n: int, seed: int) -> np.ndarray:
    """Category of each sample in the sorted store order (category, location, revisit):
    Zipf-like class sizes, locations of 1-10 revisits each."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_categories + 1) ** 0.8
    sizes = np.maximum(1, np.round(n * weights / weights.sum())).astype(int)
    cats = []
    for c, size in enumerate(sizes):
        while size > 0:
            revisits = min(size, int(rng.integers(1, 11)))
            cats += [c] * revisits
            size -= revisits
    return np.array(cats)


def _log_choose(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) if n >= k else -math.inf


def uniform_distinct_moments(counts: np.ndarray, batch: int) -> tuple[float, float]:
    """Exact mean and standard deviation of the number of distinct categories in a batch drawn
    uniformly without replacement (hypergeometric: category c absent with prob
    C(N - n_c, B) / C(N, B); pairs absent together likewise)."""
    n = int(counts.sum())
    total = _log_choose(n, batch)
    absent = np.array([math.exp(_log_choose(n - int(c), batch) - total) for c in counts])
    both = np.array(
        [
            [math.exp(_log_choose(n - int(a) - int(b), batch) - total) for b in counts]
            for a in counts
        ]
    )
    np.fill_diagonal(both, absent)
    mean = len(counts) - absent.sum()
    var = both.sum() - absent.sum() ** 2  # Var(sum of absence indicators)
    return float(mean), math.sqrt(var)


def test_shard_grouped_batches_of_a_shuffled_store_mix_categories_like_uniform_sampling() -> None:
    cats = fmow_like_categories(16, 16_384, seed=0)
    n, batch, per_shard = len(cats), 64, 256
    mean_u, sd_u = uniform_distinct_moments(np.bincount(cats), batch)
    sampler = ShardGroupedSampler(np.arange(n) // per_shard, batch, seed=1)
    # Batches of one shard share its composition, so count shards, not batches, as independent:
    # a conservative 4-sigma bound on the mean over an epoch.
    bound = 4 * sd_u / math.sqrt(math.ceil(n / per_shard))

    def mean_distinct(store_order: np.ndarray) -> float:
        at_row = cats[store_order]  # store row i holds sorted sample store_order[i]
        return float(np.mean([len(np.unique(at_row[b])) for b in sampler.batches(0)]))

    shuffled = mean_distinct(shuffled_rows(n, seed=5))
    in_order = mean_distinct(np.arange(n))
    assert 8 < mean_u < 16 and bound < 1
    assert abs(shuffled - mean_u) <= bound, (shuffled, mean_u, bound)
    assert abs(in_order - mean_u) > bound and in_order < 3  # the sorted store fails the bound
