"""Merge throughput: ``merge_shards`` on one thread (the old merge) against several threads.

Writes ``--jobs`` harmonise-style shard stores of ``--samples`` samples in total (``s2`` uint16
``(10, T, T)`` and ``rgb`` uint8 ``(3, R, R)``, smooth fields plus noise so they compress like
imagery, not like white noise), then merges them into a final store, for each ``--threads``
value and for the sorted and the shuffled order. Each configuration's best of ``--repeats``
is reported with ms per sample (wall and CPU) and the extrapolated hours for 500K samples.
The work per output shard (gathering its samples, Blosc zstd compression, which releases the
GIL, and writing its file) runs in ``threads`` threads, so the speed-up is bounded by the cores
that are free: compare runs on the same machine only. Zarr itself already compresses the chunks
of one shard write in its own thread pool (``--zarr-workers`` caps it, e.g. at 1 to see what
the merge's threads add on their own).

    python benchmarks/bench_merge.py --samples 1024 --tile 224 --rgb-tile 256 --threads 1 4 8
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from deo.data.bands import MS_BANDS
from deo.data.store import ShardWriter, merge_shards

log = logging.getLogger("bench_merge")


def smooth(rng: np.random.Generator, shape: tuple[int, ...], low: float, high: float) -> np.ndarray:
    """A random smooth field per leading channel (cumulative sums of noise), scaled to [low, high]
    plus sensor-like noise: compresses like imagery does."""
    field = rng.standard_normal(shape).cumsum(axis=-1).cumsum(axis=-2)
    field -= field.min(axis=(-2, -1), keepdims=True)
    field /= field.max(axis=(-2, -1), keepdims=True) + 1e-9
    field = low + (high - low) * field + rng.normal(0, 0.01 * (high - low), shape)
    return np.clip(field, 0, None)


def build_shards(root: Path, n: int, jobs: int, tile: int, rgb_tile: int) -> list[Path]:
    rng = np.random.default_rng(0)
    s2_pool = smooth(rng, (16, len(MS_BANDS), tile, tile), 300, 4000).astype(np.uint16)
    rgb_pool = smooth(rng, (16, 3, rgb_tile, rgb_tile), 0, 255).astype(np.uint8)
    shards = []
    for j in range(jobs):
        mine = range(j, n, jobs)
        path = root / f"shard{j}"
        with ShardWriter(path, len(mine), tile, True, rgb_tile_size=rgb_tile) as writer:
            for pos, i in enumerate(mine):
                meta = {"key": f"k{i}", "order": i, "split": "train"}
                writer.write(pos, s2_pool[i % 16], rgb_pool[(i * 7) % 16], meta)
        shards.append(path)
    return shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--jobs", type=int, default=8, help="harmonise shard stores to merge")
    parser.add_argument("--tile", type=int, default=224)
    parser.add_argument("--rgb-tile", type=int, default=256)
    parser.add_argument("--samples-per-shard", type=int, default=64)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--zarr-workers",
        type=int,
        default=None,
        help="zarr's own codec thread pool (threading.max_workers; default: zarr's, per core)",
    )
    args = parser.parse_args()
    if args.zarr_workers is not None:
        zarr.config.set({"threading.max_workers": args.zarr_workers})
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("deo").setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        shards = build_shards(root, args.samples, args.jobs, args.tile, args.rgb_tile)
        log.info("wrote %d shard stores in %.1f s", len(shards), time.perf_counter() - t0)
        best: dict[tuple[int, str], float] = {}
        cpu: dict[tuple[int, str], float] = {}
        for _ in range(args.repeats):  # rounds interleave the configurations
            for threads in args.threads:
                for order, seed in (("sorted", None), ("shuffled", 0)):
                    out = root / "out"
                    t0, c0 = time.perf_counter(), time.process_time()
                    merge_shards(
                        shards,
                        out / "s.zarr",
                        out / "s.parquet",
                        samples_per_shard=args.samples_per_shard,
                        clevel=5,
                        attrs={},
                        shuffle_seed=seed,
                        threads=threads,
                    )
                    seconds = time.perf_counter() - t0
                    key = (threads, order)
                    if seconds < best.get(key, math.inf):
                        best[key], cpu[key] = seconds, time.process_time() - c0
                    shutil.rmtree(out)
    log.info(
        "%d samples, s2 %d px, rgb %d px, %d per shard, %d shard stores, best of %d",
        *(args.samples, args.tile, args.rgb_tile, args.samples_per_shard, args.jobs),
        args.repeats,
    )
    base = best[(args.threads[0], "sorted")]
    log.info(
        "%d CPU cores visible, zarr codec threads: %s",
        os.cpu_count() or 0,
        zarr.config.get("threading.max_workers") or "zarr default",
    )
    log.info(
        "| threads | order | seconds | ms/sample | CPU ms/sample | speed-up | hours for 500K |"
    )
    log.info("|---:|---|---:|---:|---:|---:|---:|")
    for (threads, order), seconds in best.items():
        per = seconds / args.samples
        cpu_ms = 1000 * cpu[threads, order] / args.samples
        log.info(
            "| %d | %s | %.2f | %.1f | %.1f | %.2fx | %.1f |",
            *(threads, order, seconds, 1000 * per, cpu_ms, base / seconds, per * 500_000 / 3600),
        )


if __name__ == "__main__":
    main()
