"""Tiny stores and configs for tests, written by seeded code (no shared fixtures files)."""

from __future__ import annotations

from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pandas as pd
import zarr
from zarr.codecs import BloscCodec

from deo.data.bands import MS_BANDS
from deo.data.stats import band_stats, write_stats
from deo.data.store import ShardWriter, merge_shards
from deo.models.student import StudentConfig

TINY_STUDENT = StudentConfig(
    arch="swin_t",
    window_size=4,
    img_size=32,
    embed_dim=16,
    depths=(2, 2, 2, 2),
    num_heads=(1, 2, 2, 4),
    drop_path_rate=0.0,
)
"""The evaluation tests' tiny student (the demo's widths, window 4)."""

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
            has_rgb = with_rgb and i % 4 != 3  # every fourth sample has no partner
            rgb = rng.integers(0, 255, (3, tile, tile), dtype=np.uint8) if with_rgb else None
            if rgb is not None and not has_rgb:
                rgb[:] = 0
            split = "train" if i < n - 4 else "val"
            meta = {"key": f"s{i}", "order": i, "split": split, "has_rgb": has_rgb}
            writer.write(i, s2.astype(np.uint16), rgb, meta)
    store, table = root / "pretrain.zarr", root / "pretrain.parquet"
    merge_shards([shard], store, table, samples_per_shard=8, clevel=3, attrs={})
    stats = band_stats(store, pd.read_parquet(table), split="train")
    write_stats(store, stats, root / "stats.json")
    return store, table


def write_c1_store(
    root: Path,
    s2: np.ndarray,
    rgb: np.ndarray,
    has_rgb: np.ndarray,
    splits: list[str] | None = None,
    samples_per_shard: int = 4,
) -> tuple[Path, Path]:
    """A final store of contract C1 holding exactly these arrays: ``rgb`` ``(N, 3, R, R)`` at its
    own size ``R``, zeros where ``has_rgb`` is false; the layout ``merge_shards`` writes
    (one-sample chunks in sharded Blosc arrays), the table with ``has_rgb``, and the stats."""
    n, tile = s2.shape[0], s2.shape[-1]
    store, table = root / "c1.zarr", root / "c1.parquet"
    group = zarr.open_group(store, mode="w", zarr_format=3)
    for name, data in (("s2", s2), ("rgb", rgb * has_rgb[:, None, None, None])):
        array = group.create_array(
            name,
            shape=data.shape,
            dtype=data.dtype,
            chunks=(1, *data.shape[1:]),
            shards=(samples_per_shard, *data.shape[1:]),
            compressors=BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle"),
            fill_value=0,
        )
        array[:] = data
    group.attrs.update({"bands": list(MS_BANDS), "tile_size": tile, "rgb_tile_size": rgb.shape[-1]})
    frame = pd.DataFrame(
        {
            "key": [f"c{i}" for i in range(n)],
            "split": splits or ["train"] * n,
            "has_rgb": has_rgb.astype(bool),
            "index": np.arange(n, dtype=np.int64),
        }
    )
    frame.to_parquet(table, index=False)
    write_stats(store, band_stats(store, frame, split="train"), root / "c1-stats.json")
    return store, table


class QuietHandler(BaseHTTPRequestHandler):
    """A loopback test server's handler: no request log, and one way to send a reply."""

    def log_message(self, format: str, *args: object) -> None:
        """Keep the test output quiet."""

    def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
