"""Tiny stores and configs for tests, written by seeded code (no shared fixtures files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from deo.data.bands import MS_BANDS
from deo.data.stats import band_stats, write_stats
from deo.data.store import ShardWriter, merge_shards

TINY_TRAIN = {
    "student": {
        "arch": "swin_t",
        "window_size": 4,
        "img_size": 32,
        "embed_dim": 16,
        "depths": [2, 2, 2, 2],
        "num_heads": [1, 2, 2, 4],
        "drop_path_rate": 0.0,
    },
    "head": {"hidden_dim": 64, "out_dim": 32, "n_layers": 3},
    "crops": {"global_size": 32, "local_size": 16, "n_local": 2},
    "optim": {"warmup_epochs": 1},
    "epochs": 3,
    "batch_size": 4,
    "workers": 0,
    "seed": 0,
}
TINY_TEACHER = {"arch": "vit_small_patch16_dinov3", "tiny": True, "seed": 0}


def write_store(root: Path, n: int = 24, tile: int = 48, with_rgb: bool = True, seed: int = 0):
    """A merged store of ``n`` samples with two spectral classes, plus its table and stats."""
    rng = np.random.default_rng(seed)
    shard = root / "shard.zarr"
    with ShardWriter(shard, n=n, tile_size=tile, with_rgb=with_rgb) as writer:
        for i in range(n):
            base = rng.uniform(500, 3000, size=(len(MS_BANDS), 1, 1)) * (1 + i % 2)
            s2 = (base + rng.normal(0, 100, (len(MS_BANDS), tile, tile))).clip(1, 10000)
            rgb = rng.integers(0, 255, (3, tile, tile), dtype=np.uint8) if with_rgb else None
            meta = {"key": f"s{i}", "order": i, "split": "train" if i < n - 4 else "val"}
            writer.write(i, s2.astype(np.uint16), rgb, meta)
    store, table = root / "pretrain.zarr", root / "pretrain.parquet"
    merge_shards([shard], store, table, samples_per_shard=8, clevel=3, attrs={})
    stats = band_stats(store, pd.read_parquet(table), split="train")
    write_stats(store, stats, root / "stats.json")
    return store, table
