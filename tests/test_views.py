"""``deo views``: the first training batches as the model sees them, and their figure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fakes import TINY_TEACHER, TINY_TRAIN, write_c1_store, write_store
from torch.utils.data import default_collate

from deo.cache.build import build_part, finalise
from deo.cache.reader import CachedTargets
from deo.cache.spec import CacheConfig, GlobalViews
from deo.cli import main
from deo.data.bands import MS_BANDS
from deo.data.loader import PretrainDataset
from deo.data.model_input import MODEL_BANDS
from deo.data.stats import read_stats
from deo.report.views import plot_views
from deo.train.config import parse_teacher, parse_train

pytestmark = pytest.mark.usefixtures("one_thread")

N, T, R = 16, 24, 40


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Sentinel-2's visible bands ramp down the rows, the partners along the columns, so a view
    shows which one its optical channels came from (crops and flips keep each ramp's axis)."""
    rng = np.random.default_rng(0)
    s2 = rng.integers(300, 3000, (N, 10, T, T)).astype(np.uint16)
    rows = 800 + 60 * np.arange(T)[:, None] * np.ones(T)
    for band in ("B02", "B03", "B04"):
        s2[:, MS_BANDS.index(band)] = rows.astype(np.uint16)
    cols = (40 + 5 * np.arange(R))[None, :] * np.ones((R, 1))
    rgb = np.broadcast_to(cols, (N, 3, R, R)).astype(np.uint8).copy()
    has = np.arange(N) % 4 != 1
    return write_c1_store(tmp_path_factory.mktemp("views"), s2, rgb, has)


def run_views(store: tuple[Path, Path], out: Path, train: dict, batches: int = 2) -> list[Path]:
    args = ["views", "--train", json.dumps(train), "--store", str(store[0])]
    args += ["--table", str(store[1]), "--out", str(out), "--batches", str(batches)]
    assert main(args) == 0
    return sorted(out.glob("batch_*.npz"))


def test_views_are_the_model_input(store, tmp_path) -> None:
    cfg = dict(TINY_TRAIN, crops={"global_size": 32, "local_size": 16, "n_local": 2})
    cfg["ablation"] = {"optical_aug": False}  # the ramps stay ramps
    files = run_views(store, tmp_path / "views", cfg)
    assert [f.name for f in files] == ["batch_0000.npz", "batch_0001.npz"]
    table = pd.read_parquet(store[1])
    for path in files:
        d = np.load(path)
        b = cfg["batch_size"]
        assert d["global_ms"].shape == (2, b, 10, 32, 32)
        assert d["local_ms"].shape == (2, b, 10, 16, 16)
        assert d["global_rgb"].shape == (2, b, 3, 32, 32)
        assert d["local_rgb"].shape == (2, b, 3, 16, 16)
        assert list(d["channels"]) == list(MODEL_BANDS)
        assert list(d["keys"]) == table["key"].to_numpy()[d["index"]].tolist()
        assert (d["has_rgb"] == table["has_rgb"].to_numpy()[d["index"]]).all()
        for ms, rgb in (("global_ms", "global_rgb"), ("local_ms", "local_rgb")):
            assert np.array_equal(d[ms][:, :, :3], d[rgb])  # channels 0-2 are the RGB input
            optical = d[ms][:, :, :3] * d["std"][:3, None, None] + d["mean"][:3, None, None]
            for v in range(optical.shape[0]):
                for i in range(b):
                    x = optical[v, i, 0]
                    assert x.std() > 0.01, f"{path.name} {ms} {v} sample {i}: a flat view"
                    along_rows = np.abs(np.diff(x, axis=0)).max()
                    along_cols = np.abs(np.diff(x, axis=1)).max()
                    if d["has_rgb"][i]:  # the partner: varies along the columns only
                        assert along_rows < 1e-5 < along_cols
                    else:  # Sentinel-2's own RGB: along the rows only
                        assert along_cols < 1e-5 < along_rows
    assert not np.load(files[0])["has_rgb"].all() or not np.load(files[1])["has_rgb"].all()


def test_views_follow_the_run_seed_and_plot(store, tmp_path) -> None:
    cfg = dict(TINY_TRAIN, crops={"global_size": 32, "local_size": 16, "n_local": 2})
    a = np.load(run_views(store, tmp_path / "a", cfg, batches=1)[0])
    b = np.load(run_views(store, tmp_path / "b", cfg, batches=1)[0])
    c = np.load(run_views(store, tmp_path / "c", dict(cfg, seed=1), batches=1)[0])
    assert np.array_equal(a["global_ms"], b["global_ms"])
    assert not np.array_equal(a["global_ms"], c["global_ms"])
    plot_views(tmp_path / "a" / "batch_0000.npz", tmp_path / "views.png")
    assert (tmp_path / "views.png").stat().st_size > 10_000


def test_a_cached_run_shows_the_cached_global_views(tmp_path) -> None:
    """With a teacher cache the global views are cached ones (training replays them)."""
    store = write_store(tmp_path / "store", n=12)
    views = GlobalViews.from_train(parse_train(TINY_TRAIN))
    teacher = parse_teacher(TINY_TEACHER)
    build_part(*store, teacher, views, CacheConfig(batch_size=4), 0, tmp_path / "w", tmp_path / "p")
    finalise([tmp_path / "p"], tmp_path / "cache.zarr")
    args = ["views", "--train", json.dumps(TINY_TRAIN), "--teacher", json.dumps(TINY_TEACHER)]
    args += ["--teacher-cache", str(tmp_path / "cache.zarr"), "--store", str(store[0])]
    args += ["--table", str(store[1]), "--out", str(tmp_path / "v"), "--batches", "1"]
    assert main(args) == 0
    d = np.load(tmp_path / "v" / "batch_0000.npz")
    cache = CachedTargets(tmp_path / "cache.zarr")
    multicrop = views.multicrop(read_stats(store[0]))
    batch = default_collate(
        PretrainDataset(*store, with_rgb=True).__getitems__(d["index"].tolist())
    )
    size = views.global_size
    for slot in range(2):
        candidates = [
            multicrop.apply(
                batch["s2"],
                batch["rgb"],
                batch["has_rgb"],
                cache.read(d["index"], np.full(len(d["index"]), k))[0],
                size,
            ).numpy()
            for k in range(slot, cache.k, 2)
        ]
        for i in range(len(d["index"])):
            assert any(np.array_equal(d["global_ms"][slot, i], c[i]) for c in candidates)
