"""The data stages as functions on a synthetic mirror: fetch over file://, pair, a harmonise
shard that is interrupted and resumes to exactly what an uninterrupted run writes, and the
merged store's per-sample columns (co-registration, footprint, shuffled order)."""

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
        "harmonise": {"tile_size": 64, "rgb_tile_size": 96, "shards": 2},
        "store": {"samples_per_shard": 4, "shuffle_seed": 3, "merge_threads": 2},
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


def test_merged_store_flags_partners_and_rejects_misregistered_ones(
    pairs: Path, tmp_path: Path
) -> None:
    shards = [tmp_path / f"{i}.zarr" for i in range(2)]
    for i, shard in enumerate(shards):
        stages.harmonise_shard(pairs, i, 2, CFG.harmonise, True, shard, shard.with_suffix(".csv"))
    out = tmp_path / "store.zarr"
    stages.merge(
        shards,
        [pairs.parent / "pair_rejects.csv", *(s.with_suffix(".csv") for s in shards)],
        pairs,
        CFG,
        out,
        tmp_path / "table.parquet",
        tmp_path / "rejects.csv",
        tmp_path / "counts.json",
    )
    table = pd.read_parquet(tmp_path / "table.parquet")
    group = zarr.open_group(out, mode="r")
    rgb = group["rgb"][:]
    assert rgb.shape == (len(table), 3, 96, 96) and group.attrs["rgb_tile_size"] == 96

    bad = json.loads((pairs.parent / "mirror" / "bad_inputs.json").read_text())
    misregistered = {b["path"] for b in bad if b["kind"].startswith("misregistered")}
    rejects = pd.read_csv(tmp_path / "rejects.csv")
    coreg = rejects[rejects["stage"] == "coreg"]
    assert {p.split("rgb/", 1)[1] for p in coreg["path"]} == misregistered
    assert coreg["reason"].str.match(r"co-registration check failed: score -?0\.\d{3} < ").all()

    is_misregistered = table["key"].isin({p.replace("_rgb.jpg", ".tif") for p in misregistered})
    assert not table.loc[is_misregistered, "has_rgb"].any()
    assert (table.loc[is_misregistered, "coreg_score"] < CFG.harmonise.coreg_min_score).all()
    assert (table.loc[table["has_rgb"], "coreg_score"] >= CFG.harmonise.coreg_min_score).all()
    no_partner = table["pairing"] != "paired"
    assert table.loc[no_partner, "coreg_score"].isna().all()
    assert not rgb[~table["has_rgb"].to_numpy()].any() and rgb[table["has_rgb"].to_numpy()].any()

    # the footprint: bounds in the grid CRS, T pixels over it
    width = table["footprint_right"] - table["footprint_left"]
    height = table["footprint_top"] - table["footprint_bottom"]
    assert table["footprint_crs"].str.match(r"EPSG:32[67]\d\d$").all()
    np.testing.assert_allclose(table["gsd_m_eff"], np.sqrt(width * height) / 64)
    assert table["gsd_m_eff"].between(7, 16).all()  # the mirror's 48-96 px scenes at 10 m

    # stored in a seeded permutation of the (order, key) order
    expected = np.sort(table["order"].to_numpy())[np.random.default_rng(3).permutation(len(table))]
    np.testing.assert_array_equal(table["order"].to_numpy(), expected)
    counts = json.loads((tmp_path / "counts.json").read_text())
    assert counts["rejects_by_stage"]["coreg"] == 2
    assert counts["partners_stored"] == int(table["has_rgb"].sum())


def test_pairing_counts_add_up(pairs: Path) -> None:
    table = pd.read_parquet(pairs)
    counts = json.loads((pairs.parent / "pair_counts.json").read_text())
    assert sum(v for k, v in counts.items() if not k.startswith("rejected")) == len(table)
    assert counts["rejected_missing_tif"] == 1
    assert set(table["pairing"]) <= {"paired", "ms_only_by_design", "partner_missing"}
