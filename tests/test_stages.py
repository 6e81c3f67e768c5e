"""The data stages as functions on a synthetic mirror: fetch over file://, pair, and a harmonise
shard that is interrupted and resumes to exactly what an uninterrupted run writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from deo.config import DataConfig, MirrorConfig, from_dict
from deo.data import stages
from deo.data.fetch import verify_manifest
from deo.data.mirror import write_mirror

CFG = from_dict(
    DataConfig,
    {
        "mirror": {"locations_per_category": 2, "images_per_location": 2, "bad_inputs": True},
        "selection": {"splits": ["train", "val", "test"], "max_samples": 1000},
        "harmonise": {"tile_size": 64, "shards": 2},
        "store": {"samples_per_shard": 4},
        "fetch": {"workers": 2, "backoff_s": 0.01},
        "max_reject_fraction": 0.5,
    },
)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stages")
    s = CFG.sentinel
    mirror = root / "mirror"
    assert isinstance(CFG.mirror, MirrorConfig)
    write_mirror(
        CFG.mirror,
        mirror,
        csvs=s.csvs,
        archive=s.archive,
        archive_prefix=s.archive_prefix,
        folders=s.folders,
        rgb_mappings=CFG.rgb.mappings,
    )
    dl = root / "downloads"
    stages.fetch_files(
        (mirror / "sentinel").as_uri() + "/",
        [s.archive, *s.csvs.values()],
        dl / "sentinel",
        root / "sentinel_fetch.csv",
        cfg=CFG,
    )
    assert verify_manifest(dl / "sentinel/manifest.json") == []
    stages.select(dl / "sentinel", s, CFG.selection, root / "selection.parquet")
    stages.extract(
        dl / "sentinel" / s.archive,
        root / "selection.parquet",
        s.archive_prefix,
        dl / "scenes",
        root / "extracted.csv",
        root / "skipped.csv",
    )
    stages.fetch_partners(
        root / "selection.parquet",
        (mirror / "rgb").as_uri() + "/",
        dl / "rgb",
        root / "rgb.csv",
        cfg=CFG,
    )
    stages.pair(
        root / "selection.parquet",
        dl / "scenes",
        dl / "rgb",
        root / "rgb.csv",
        root / "skipped.csv",
        s.archive_prefix,
        root / "pairs.parquet",
        root / "pair_rejects.csv",
        root / "pair_counts.json",
        rgb_mappings=CFG.rgb.mappings,
    )
    return root / "pairs.parquet"


def harmonise(pairs: Path, out: Path) -> None:
    stages.harmonise_shard(pairs, 0, 2, CFG.harmonise, True, out, out.with_suffix(".csv"))


def merged(shard: Path, root: Path) -> tuple[np.ndarray, pd.DataFrame]:
    from deo.data.store import merge_shards

    store, table = root / "s.zarr", root / "s.parquet"
    merge_shards([shard], store, table, samples_per_shard=4, clevel=1, attrs={})
    return zarr.open_group(store, mode="r")["s2"][:], pd.read_parquet(table)


def test_interrupted_shard_resumes_to_the_same_result(
    pairs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean = tmp_path / "clean" / "0.zarr"
    clean.parent.mkdir()
    harmonise(pairs, clean)

    calls = {"n": 0}
    original = stages.read_s2

    def failing(path, cfg):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("killed")
        return original(path, cfg)

    resumed = tmp_path / "resumed" / "0.zarr"
    resumed.parent.mkdir()
    monkeypatch.setattr(stages, "read_s2", failing)
    with pytest.raises(RuntimeError, match="killed"):
        harmonise(pairs, resumed)
    partial = resumed.with_name("0.zarr.partial")
    assert partial.exists() and not resumed.exists()
    done_before = len(pd.read_parquet(partial / "table.parquet"))
    assert 1 <= done_before <= 3

    monkeypatch.setattr(stages, "read_s2", original)
    harmonise(pairs, resumed)
    assert not partial.exists()
    a, ta = merged(clean, tmp_path / "clean")
    b, tb = merged(resumed, tmp_path / "resumed")
    assert ta["key"].tolist() == tb["key"].tolist()
    np.testing.assert_array_equal(a, b)
    assert pd.read_csv(clean.with_suffix(".csv")).equals(pd.read_csv(resumed.with_suffix(".csv")))


def test_pairing_counts_add_up(pairs: Path) -> None:
    table = pd.read_parquet(pairs)
    counts = json.loads((pairs.parent / "pair_counts.json").read_text())
    assert sum(v for k, v in counts.items() if not k.startswith("rejected")) == len(table)
    assert counts["rejected_missing_tif"] == 1
    assert set(table["pairing"]) <= {"paired", "ms_only_by_design", "partner_missing"}
