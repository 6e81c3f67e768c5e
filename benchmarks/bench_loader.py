"""Loader throughput: our sharded Zarr store vs the authors' one-HDF5-file pattern.

Both get the same random tiles. The authors' pattern re-opens one HDF5 file (all images,
h5py defaults: contiguous, uncompressed) in ``__getitem__`` for every item, reads that item
whole and normalises it in numpy. Ours is ``ShardWriter`` + ``merge_shards`` +
``PretrainDataset`` / ``make_loader``. A full epoch of ``DataLoader`` iteration is timed for each
at equal workers and batch size; the best of ``--repeats`` epochs is reported. A no-op dataset
producing batches of the same shapes gives the ceiling that DataLoader's own collate and worker
IPC impose on this machine.

First, a second table measures what a batch *contains*: the categories per batch that
``ShardGroupedSampler`` gives over the sorted store order (split, category, location, image)
and over the shuffled order ``merge_shards`` writes, against batches drawn uniformly at random
(the obvious alternative, which reads one chunk per sample from all over the store). The
labels are an fMoW-like table (``--categories`` classes of Zipf-like sizes, locations of 1-10
revisits); only the order matters, so no pixels are read.

    python benchmarks/bench_loader.py --samples 2000 --tile 64 --workers 0 2
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from deo.data.bands import MS_BANDS
from deo.data.loader import PretrainDataset, ShardGroupedSampler, make_loader
from deo.data.stats import band_stats, write_stats
from deo.data.store import ShardWriter, merge_shards, shuffled_rows

log = logging.getLogger("bench_loader")


def make_data(n: int, tile: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Tiles with a realistic value range (DN around 1500, some nodata), same for both stores."""
    rng = np.random.default_rng(seed)
    s2 = np.clip(rng.normal(1500, 400, (n, len(MS_BANDS), tile, tile)), 0, 10000).astype(np.uint16)
    s2[:, :, :2] = 0
    rgb = rng.integers(0, 256, (n, 3, tile, tile), dtype=np.uint8)
    return s2, rgb


def build_zarr(root: Path, s2: np.ndarray, rgb: np.ndarray, samples_per_shard: int) -> Path:
    """Our path: 4 harmonise-style shard stores, merged, with statistics written."""
    n, tile = len(s2), s2.shape[-1]
    parts = np.array_split(np.arange(n), 4)
    shards = []
    for j, part in enumerate(parts):
        shard = root / f"shard{j}"
        with ShardWriter(shard, len(part), tile, with_rgb=True) as writer:
            for pos, i in enumerate(part):
                writer.write(
                    pos, s2[i], rgb[i], {"key": f"s{i}", "order": int(i), "split": "train"}
                )
        shards.append(shard)
    store, table = root / "pretrain.zarr", root / "pretrain.parquet"
    merge_shards(
        shards,
        store,
        table,
        samples_per_shard=samples_per_shard,
        clevel=5,
        attrs={},
        shuffle_seed=0,
    )
    write_stats(store, band_stats(store, split=None), root / "stats.json")
    return store


class AuthorsH5Dataset(Dataset):
    """The pattern we compare with: open the one HDF5 file per item, read it, normalise."""

    def __init__(self, path: Path, mean: np.ndarray, std: np.ndarray) -> None:
        self.path = path
        self.mean = mean
        self.std = std
        with h5py.File(path, "r") as f:
            self.n = f["s2"].shape[0]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        with h5py.File(self.path, "r") as f:
            s2 = f["s2"][i]
            rgb = f["rgb"][i]
        s2 = (s2.astype(np.float32) - self.mean) / self.std
        return {
            "s2": torch.from_numpy(s2),
            "rgb": torch.from_numpy(rgb.astype(np.float32) / 255),
            "index": torch.tensor(i),
        }


class NoopDataset(Dataset):
    """Batches of zeros shaped like ours: what DataLoader itself (collate, IPC) costs."""

    def __init__(self, n: int, tile: int) -> None:
        self.n = n
        self.tile = tile

    def __len__(self) -> int:
        return self.n

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        s2 = torch.zeros(len(indices), len(MS_BANDS), self.tile, self.tile)
        rgb = torch.zeros(len(indices), 3, self.tile, self.tile)
        return [
            {"s2": s2[j], "rgb": rgb[j], "index": torch.tensor(i)} for j, i in enumerate(indices)
        ]


def build_h5(path: Path, s2: np.ndarray, rgb: np.ndarray) -> Path:
    with h5py.File(path, "w") as f:
        f["s2"] = s2
        f["rgb"] = rgb
    return path


def time_epoch(loader: DataLoader, repeats: int) -> float:
    """Best samples/s over ``repeats`` full epochs (the first also warms the page cache)."""
    best = 0.0
    for epoch in range(repeats):
        if hasattr(loader.batch_sampler, "set_epoch"):
            loader.batch_sampler.set_epoch(epoch)
        seen, t0 = 0, time.perf_counter()
        for batch in loader:
            seen += len(batch["index"])
        best = max(best, seen / (time.perf_counter() - t0))
    return best


def plain_loader(dataset: Dataset, batch_size: int, workers: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )


def fmow_like_categories(n_categories: int, n: int, seed: int) -> np.ndarray:
    """Category of each sample in sorted store order: Zipf-like class sizes, 1-10 revisits."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_categories + 1) ** 0.8
    sizes = np.maximum(1, np.round(n * weights / weights.sum())).astype(int)
    cats: list[int] = []
    for c, size in enumerate(sizes):
        while size > 0:
            revisits = min(size, int(rng.integers(1, 11)))
            cats += [c] * revisits
            size -= revisits
    return np.array(cats)


def batch_mix(cats: np.ndarray, batches: list[np.ndarray]) -> tuple[float, float, float]:
    """Mean distinct categories, mean share of the largest category, and the mean total
    variation distance between a batch's category shares and the whole table's."""
    overall = np.bincount(cats, minlength=cats.max() + 1) / len(cats)
    distinct, largest, tvd = [], [], []
    for b in batches:
        share = np.bincount(cats[b], minlength=len(overall)) / len(b)
        distinct.append(np.count_nonzero(share))
        largest.append(share.max())
        tvd.append(0.5 * np.abs(share - overall).sum())
    return float(np.mean(distinct)), float(np.mean(largest)), float(np.mean(tvd))


def category_table(n: int, n_categories: int, batch: int, per_shard: int) -> None:
    cats = fmow_like_categories(n_categories, n, seed=0)
    sampler = ShardGroupedSampler(np.arange(len(cats)) // per_shard, batch, seed=0)
    rng = np.random.default_rng(1)
    uniform = [rng.choice(len(cats), batch, replace=False) for _ in range(len(sampler))]
    shuffled = shuffled_rows(len(cats), 0)  # store row i holds sorted sample shuffled[i]
    rows = {
        "sorted store, shard-grouped batches": [np.asarray(b) for b in sampler.batches(0)],
        "shuffled store, shard-grouped batches": [shuffled[b] for b in sampler.batches(0)],
        "uniform random batches (any store)": uniform,
    }
    log.info(
        "%d samples, %d categories, batch %d, %d samples/shard, one epoch (%d batches)",
        *(len(cats), n_categories, batch, per_shard, len(sampler)),
    )
    log.info("| store order, sampler | categories/batch | largest category share | TVD to all |")
    log.info("|---|---:|---:|---:|")
    for name, batches in rows.items():
        log.info("| %s | %.2f | %.3f | %.3f |", name, *batch_mix(cats, batches))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--tile", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--samples-per-shard", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--mix-samples", type=int, default=65_536)
    parser.add_argument("--categories", type=int, default=62, help="fMoW has 62")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("deo").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    category_table(args.mix_samples, args.categories, args.batch_size, args.samples_per_shard)

    s2, rgb = make_data(args.samples, args.tile, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        store = build_zarr(root, s2, rgb, args.samples_per_shard)
        log.info("built Zarr store in %.1f s", time.perf_counter() - t0)
        h5 = build_h5(root / "authors.h5", s2, rgb)
        ours = PretrainDataset(store, with_rgb=True)
        theirs = AuthorsH5Dataset(h5, ours.mean, ours.std)
        noop = NoopDataset(args.samples, args.tile)
        rows = []
        for workers in args.workers:
            loaders = (
                make_loader(ours, args.batch_size, workers=workers, seed=0),
                plain_loader(theirs, args.batch_size, workers),
                plain_loader(noop, args.batch_size, workers),
            )
            rows.append((workers, *(time_epoch(loader, args.repeats) for loader in loaders)))
    log.info(
        "%d samples, %d x %d px, batch %d, %d samples/shard",
        *(args.samples, args.tile, args.tile, args.batch_size, args.samples_per_shard),
    )
    log.info("| workers | ours (samples/s) | authors' HDF5 (samples/s) | ratio | no-op ceiling |")
    log.info("|---:|---:|---:|---:|---:|")
    for workers, ours_rate, their_rate, noop_rate in rows:
        ratio = ours_rate / their_rate
        log.info(
            "| %d | %.0f | %.0f | %.2fx | %.0f |", workers, ours_rate, their_rate, ratio, noop_rate
        )


if __name__ == "__main__":
    main()
