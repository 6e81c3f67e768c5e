"""The synthetic fMoW mirror: layout, formats, broken inputs, determinism, learnable classes."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.io import MemoryFile

import deo.data.mirror as mirror_mod
from deo.config import MirrorConfig, SentinelSource
from deo.data.bands import SENTINEL2_BANDS
from deo.data.fmow import CSV_COLUMNS
from deo.data.mirror import BAD_KINDS, MirrorSummary, write_mirror

SOURCE = SentinelSource()
CFG = MirrorConfig()
PREFIX = SOURCE.archive_prefix
TIF_KINDS = {"truncated_tif", "wrong_band_count", "wrong_dtype", "all_nodata", "missing_tif"}
JSON_KEYS = {"gsd", "utm", "timestamp", "img_width", "img_height", "country_code", "cloud_cover"}
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
POLYGON = re.compile(r"^POLYGON \(\((-?\d+\.\d+ -?\d+\.\d+, ){4}-?\d+\.\d+ -?\d+\.\d+\)\)$")


def _write(cfg: MirrorConfig, out: Path) -> MirrorSummary:
    return write_mirror(
        cfg, out, csvs=SOURCE.csvs, archive=SOURCE.archive, archive_prefix=SOURCE.archive_prefix
    )


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, MirrorSummary]:
    out = tmp_path_factory.mktemp("mirror")
    return out, _write(CFG, out)


def read_rows(out: Path) -> dict[str, list[dict[str, str]]]:
    rows = {}
    for split, name in SOURCE.csvs.items():
        with open(out / "sentinel" / name, newline="") as f:
            rows[split] = list(csv.DictReader(f))
    return rows


def tif_relpath(split: str, row: dict[str, str]) -> str:
    cat, loc, image = row["category"], row["location_id"], row["image_id"]
    return f"{split}/{cat}/{cat}_{loc}/{cat}_{loc}_{image}.tif"


def archive_members(out: Path) -> dict[str, bytes]:
    with tarfile.open(out / "sentinel" / SOURCE.archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def bad_paths(summary: MirrorSummary, kinds: set[str]) -> set[str]:
    return {b["path"] for b in summary.bad_inputs if b["kind"] in kinds}


def test_counts_and_split_csvs(mirror) -> None:
    out, summary = mirror
    n_locations = len(CFG.categories) * CFG.locations_per_category
    per_location = CFG.images_per_location + CFG.ms_only_images_per_location
    assert summary.n_scenes == n_locations * per_location == 64
    rows = read_rows(out)
    for split, name in SOURCE.csvs.items():
        header = (out / "sentinel" / name).read_text().splitlines()[0]
        assert header == ",".join(CSV_COLUMNS) == "category,location_id,image_id,timestamp,polygon"
        assert rows[split], f"split {split} is empty"
    assert sum(len(r) for r in rows.values()) == summary.n_scenes
    assert len(rows["train"]) > len(rows["val"]) and len(rows["train"]) > len(rows["test"])
    locations: dict[tuple[str, str, str], set[int]] = {}
    for split, split_rows in rows.items():
        for row in split_rows:
            assert TIMESTAMP.match(row["timestamp"]) and POLYGON.match(row["polygon"])
            key = (split, row["category"], row["location_id"])
            locations.setdefault(key, set()).add(int(row["image_id"]))
    assert len(locations) == n_locations
    assert all(ids == {0, 1, 2, 100} for ids in locations.values())


def test_locations_span_hemispheres_and_zones(mirror) -> None:
    out, _ = mirror
    centres = set()
    for split_rows in read_rows(out).values():
        for row in split_rows:
            numbers = [float(v) for v in re.findall(r"-?\d+\.\d+", row["polygon"])]
            centres.add((round(np.mean(numbers[0:8:2]), 3), round(np.mean(numbers[1:8:2]), 3)))
    lats = [lat for _, lat in centres]
    zones = {int((lon + 180) // 6) + 1 for lon, _ in centres}
    assert min(lats) < -10 and max(lats) > 10 and len(zones) >= 8


def test_archive_layout_matches_the_csvs(mirror) -> None:
    out, summary = mirror
    members = archive_members(out)
    pattern = re.compile(rf"^{re.escape(PREFIX)}(train|val|test)/(\w+)/\2_(\d+)/\2_\3_(\d+)\.tif$")
    assert all(pattern.match(name) for name in members), sorted(members)[:3]
    listed = {tif_relpath(s, r) for s, split_rows in read_rows(out).items() for r in split_rows}
    missing = bad_paths(summary, {"missing_tif"})
    assert len(missing) == 1
    assert {name.removeprefix(PREFIX) for name in members} == listed - missing


def test_geotiffs_are_13_band_uint16_epsg4326_at_about_10m(mirror) -> None:
    out, summary = mirror
    broken = bad_paths(summary, TIF_KINDS)
    low, high = CFG.size_px
    checked = 0
    for name, blob in archive_members(out).items():
        if name.removeprefix(PREFIX) in broken:
            continue
        with MemoryFile(blob) as mem, mem.open() as src:
            assert src.count == 13 and set(src.dtypes) == {"uint16"}
            assert src.crs.to_epsg() == 4326
            assert src.descriptions == tuple(b.name for b in SENTINEL2_BANDS)
            assert src.compression.name.lower() == "deflate"
            assert low <= src.width <= high and low <= src.height <= high
            lat = src.xy(src.height // 2, src.width // 2)[1]
            res_x_m = src.res[0] * 111_320 * math.cos(math.radians(lat))
            assert res_x_m == pytest.approx(10, abs=0.1)
            assert src.res[1] * 110_574 == pytest.approx(10, abs=0.1)
            data = src.read()
        assert data.min() > 0 and data.max() < 12_000
        assert 300 < np.median(data[[1, 2, 3, 7, 11]]) < 5000
        checked += 1
    assert checked == summary.n_scenes - len(broken)


def test_rgb_partners_have_fmow_metadata(mirror) -> None:
    out, summary = mirror
    rgb = out / "rgb"
    polygons = {
        tif_relpath(s, r).removesuffix(".tif"): r["polygon"]
        for s, split_rows in read_rows(out).items()
        for r in split_rows
    }
    jpgs, metas = sorted(rgb.rglob("*_rgb.jpg")), sorted(rgb.rglob("*_rgb.json"))
    assert len(jpgs) == len(metas) == summary.n_rgb == 4 * 4 * 3 - 1
    corrupt, bad_json = bad_paths(summary, {"corrupt_jpeg"}), bad_paths(summary, {"bad_json"})
    for meta_path in metas:
        rel = meta_path.relative_to(rgb).as_posix()
        if rel in bad_json:
            continue
        meta = json.loads(meta_path.read_text())
        assert set(meta) >= JSON_KEYS and re.match(r"^\d{1,2}[C-HJ-NP-X]$", meta["utm"])
        assert 0.5 <= meta["gsd"] <= 2.0 and TIMESTAMP.match(meta["timestamp"])
        (box,) = meta["bounding_boxes"]
        assert {"box", "category", "ID", "raw_location"} <= set(box)
        assert box["raw_location"] == polygons[rel.removesuffix("_rgb.json")]
        x, y, w, h = box["box"]
        assert min(x, y) >= 0 and x + w <= meta["img_width"] and y + h <= meta["img_height"]
        jpg = meta_path.with_suffix(".jpg")
        if jpg.relative_to(rgb).as_posix() not in corrupt:
            with Image.open(jpg) as im:
                assert im.size == (meta["img_width"], meta["img_height"]) and im.mode == "RGB"


def test_bad_inputs_exist_and_are_listed(mirror) -> None:
    out, summary = mirror
    assert sorted(b["kind"] for b in summary.bad_inputs) == sorted(BAD_KINDS)
    assert json.loads((out / "bad_inputs.json").read_text()) == summary.bad_inputs
    record = json.loads((out / "mirror.json").read_text())
    assert record["n_scenes"] == summary.n_scenes and record["bad_inputs"] == summary.bad_inputs
    members = archive_members(out)
    by_kind = {b["kind"]: b["path"] for b in summary.bad_inputs}
    rgb = out / "rgb"

    assert PREFIX + by_kind["missing_tif"] not in members
    assert not (rgb / by_kind["missing_rgb"]).exists()
    assert not (rgb / by_kind["missing_rgb"]).with_suffix(".json").exists()
    with pytest.raises(json.JSONDecodeError):
        json.loads((rgb / by_kind["bad_json"]).read_text())
    with pytest.raises(OSError), Image.open(rgb / by_kind["corrupt_jpeg"]) as im:
        im.load()
    with (
        pytest.raises(rasterio.errors.RasterioIOError),
        MemoryFile(members[PREFIX + by_kind["truncated_tif"]]) as mem,
        mem.open() as src,
    ):
        src.read()
    for kind, check in {
        "wrong_band_count": lambda s, d: s.count == 12,
        "wrong_dtype": lambda s, d: d.dtype == np.float32,
        "all_nodata": lambda s, d: s.count == 13 and not d.any(),
    }.items():
        with MemoryFile(members[PREFIX + by_kind[kind]]) as mem, mem.open() as src:
            assert check(src, src.read()), kind


def test_misregistered_partners_keep_valid_metadata_but_show_displaced_ground(
    mirror, tmp_path: Path
) -> None:
    out, summary = mirror
    listed = {b["kind"]: b["path"] for b in summary.bad_inputs}
    for kind in ("misregistered_shift", "misregistered_scale"):
        jpg = out / "rgb" / listed[kind]
        assert jpg.name.endswith("_rgb.jpg")
        # the same partner written correctly: identical metadata, other pixels
        scene = next(
            s for s in mirror_mod._plan(CFG, list(SOURCE.csvs)) if s.rgb_relpaths[0] == listed[kind]
        )
        mirror_mod._write_rgb(scene, tmp_path / kind, CFG.rgb_size_px, None)
        right = tmp_path / kind / listed[kind]
        assert jpg.with_suffix(".json").read_text() == right.with_suffix(".json").read_text()
        with Image.open(jpg) as wrong_im, Image.open(right) as right_im:
            wrong, good = np.asarray(wrong_im, float), np.asarray(right_im, float)
        assert wrong.shape == good.shape and np.abs(wrong - good).mean() > 5, kind
    assert mirror_mod.MISREGISTER_SHIFT_M >= 100 and mirror_mod.MISREGISTER_SCALE >= 1.5


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path) -> None:
    small = MirrorConfig(categories=("airport", "lake_or_pond"), locations_per_category=2)
    first, again = _write(small, tmp_path / "a"), _write(small, tmp_path / "b")
    assert first == again
    for name in SOURCE.csvs.values():
        a, b = (tmp_path / d / "sentinel" / name for d in "ab")
        assert a.read_bytes() == b.read_bytes()
    a_members, b_members = archive_members(tmp_path / "a"), archive_members(tmp_path / "b")
    name = sorted(a_members)[0]
    with (
        MemoryFile(a_members[name]) as ma,
        MemoryFile(b_members[name]) as mb,
        ma.open() as sa,
        mb.open() as sb,
    ):
        np.testing.assert_array_equal(sa.read(), sb.read())
    assert (tmp_path / "a/sentinel" / SOURCE.archive).read_bytes() == (
        tmp_path / "b/sentinel" / SOURCE.archive
    ).read_bytes()
    other = _write(dataclasses.replace(small, seed=1), tmp_path / "c")
    assert other.n_scenes == first.n_scenes
    assert (tmp_path / "c/sentinel/train.csv").read_bytes() != (
        tmp_path / "a/sentinel/train.csv"
    ).read_bytes()


def test_categories_are_separable_from_the_multispectral_bands(mirror) -> None:
    """Nearest centroid on centre-window band means/stds, leaving each location out, works."""
    out, summary = mirror
    broken = bad_paths(summary, TIF_KINDS)
    features, categories, locations = [], [], []
    for name, blob in archive_members(out).items():
        rel = name.removeprefix(PREFIX)
        if rel in broken:
            continue
        with MemoryFile(blob) as mem, mem.open() as src:
            data = src.read().astype(np.float64)
        h, w = data.shape[1:]
        centre = data[:, h // 2 - 12 : h // 2 + 12, w // 2 - 12 : w // 2 + 12].reshape(13, -1)
        features.append(np.concatenate([centre.mean(axis=1), centre.std(axis=1)]))
        split, category, location = rel.split("/")[:3]
        categories.append(category)
        locations.append(f"{split}/{location}")
    x = np.array(features)
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    cats, locs = np.array(categories), np.array(locations)
    correct = 0
    for i in range(len(x)):
        train = locs != locs[i]
        centroids = {c: x[train & (cats == c)].mean(axis=0) for c in set(cats)}
        correct += min(centroids, key=lambda c: np.linalg.norm(x[i] - centroids[c])) == cats[i]
    assert correct / len(x) >= 0.8


# --- real-format cases -----------------------------------------------------------------------

REAL = dataclasses.replace(
    CFG,
    categories=("port", "crop_field"),
    locations_per_category=4,
    images_per_location=2,
    ms_only_images_per_location=0,
    bad_inputs=False,
    size_px=(10, 600),
    size_dist="log_uniform",
    s2_dtypes=("uint16", "float32"),
    rgb_json_variants=("object", "id_minus_one_first", "footprint_location", "no_location"),
    member_dot_slash=True,
)
MAPPING = {"test": "test_gt_mapping.json"}


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("real")
    write_mirror(
        REAL,
        out,
        csvs=SOURCE.csvs,
        archive=SOURCE.archive,
        archive_prefix=PREFIX,
        folders={"test": "test_gt"},
        rgb_mappings=MAPPING,
    )
    return out


def test_real_layout_dot_members_test_gt_and_mapped_rgb_folders(real) -> None:
    names = list(archive_members(real))
    assert names and all(n.startswith("./" + PREFIX) for n in names)
    folders = {n.removeprefix("./" + PREFIX).split("/")[0] for n in names}
    assert folders == {"train", "val", "test_gt"}
    mapping = json.loads((real / "rgb" / MAPPING["test"]).read_text())
    test_rows = read_rows(real)["test"]
    assert {f"test_gt/{r['category']}/{r['category']}_{r['location_id']}" for r in test_rows} == {
        e["input"] for e in mapping
    }
    for entry in mapping:
        secret = entry["output"].split("/")[1]
        assert re.fullmatch(r"test/\d{7}", entry["output"])
        jsons = sorted((real / "rgb" / entry["output"]).glob("*_rgb.json"))
        assert [p.name for p in jsons] == [f"{secret}_{i}_rgb.json" for i in range(2)]
    assert not (real / "rgb" / "test").joinpath("port").exists()


def test_real_sizes_and_dtypes(real) -> None:
    sizes, dtypes = [], set()
    for blob in archive_members(real).values():
        with MemoryFile(blob) as mem, mem.open() as src:
            sizes += [src.height, src.width]
            dtypes.add(src.dtypes[0])
    assert min(sizes) >= 10 and max(sizes) <= 600 and np.median(sizes) < 150
    assert dtypes == {"uint16", "float32"}


def test_float32_tiles_hold_the_same_dns_as_uint16(real, tmp_path) -> None:
    other = dataclasses.replace(REAL, s2_dtypes=("float32",), member_dot_slash=False)
    write_mirror(
        other,
        tmp_path,
        csvs=SOURCE.csvs,
        archive=SOURCE.archive,
        archive_prefix=PREFIX,
        folders={"test": "test_gt"},
    )
    floats = archive_members(tmp_path)
    compared = 0
    for name, blob in archive_members(real).items():
        with MemoryFile(blob) as mem, mem.open() as src:
            if src.dtypes[0] != "uint16":
                continue
            ints = src.read()
        with MemoryFile(floats[name.removeprefix("./")]) as mem, mem.open() as src:
            assert src.dtypes[0] == "float32"
            np.testing.assert_array_equal(src.read(), ints.astype(np.float32))
        compared += 1
    assert compared >= 3


def test_real_json_variants_are_each_placed_on_the_ground_sentinel_sees(real, tmp_path) -> None:
    from deo.config import HarmoniseConfig
    from deo.data.harmonise import read_rgb, read_s2

    # rgb at the tile size, so the partner compares with Sentinel-2 pixel for pixel
    cfg = HarmoniseConfig(tile_size=64, rgb_tile_size=64, max_nodata_fraction=1.0)
    scenes = tmp_path / "scenes"
    with tarfile.open(real / "sentinel" / SOURCE.archive) as tar:
        tar.extractall(scenes, filter="data")
    polygons = {
        (split, r["category"], r["location_id"], r["image_id"]): r["polygon"]
        for split, rows in read_rows(real).items()
        for r in rows
    }
    seen = set()
    for meta_json in sorted((real / "rgb").rglob("*_rgb.json")):
        meta = json.loads(meta_json.read_text())
        entries = meta["bounding_boxes"]
        variant = (
            "id_minus_one_first"
            if len(entries) == 2
            else "no_location"
            if "raw_location" not in entries[0]
            else "footprint_location"
            if "POLYGON" in entries[0]["raw_location"] and _is_footprint(entries[0], meta)
            else "object"
        )
        split = meta_json.relative_to(real / "rgb").parts[0]
        folder = {"test": "test_gt"}.get(split, split)
        tif = next((scenes / PREFIX / folder).rglob(_tif_name(meta_json, real)))
        cat, loc, image = _ids(tif)
        s2, grid, _ = read_s2(tif, cfg)
        rgb, info = read_rgb(
            meta_json.with_suffix(".jpg"), meta_json, grid, cfg, polygons[(split, cat, loc, image)]
        )
        expected_box = {"footprint_location": "whole image"}.get(variant)
        if expected_box:
            assert info["rgb_box"] == expected_box, meta_json
        assert info["rgb_gsd_ratio"] == pytest.approx(1.0, abs=0.1)
        both = (rgb.max(axis=0) > 0) & (s2.max(axis=0) > 0)
        r = np.corrcoef(
            rgb.astype(float).mean(axis=0)[both], s2[:3].astype(float).mean(axis=0)[both]
        )
        assert r[0, 1] > 0.7, (meta_json, variant, r[0, 1])
        seen.add(variant)
    assert seen == set(REAL.rgb_json_variants)


def _is_footprint(entry: dict, meta: dict) -> bool:
    """Whether an entry's polygon is far wider than its box at the image's gsd (a footprint)."""
    pairs = re.findall(r"(-?\d+\.\d+) (-?\d+\.\d+)", entry["raw_location"])
    lon, lat = (np.array(v, dtype=float) for v in zip(*pairs, strict=True))
    width_m = (lon.max() - lon.min()) * 111_320 * math.cos(math.radians(lat.mean()))
    return width_m / entry["box"][2] > 1.5 * meta["gsd"]


def _tif_name(meta_json: Path, real: Path) -> str:
    """The Sentinel tile's file name of an RGB partner, through the mapping for test."""
    rel = meta_json.relative_to(real / "rgb").as_posix()
    stem = meta_json.name.removesuffix("_rgb.json")
    if rel.startswith("test/"):
        folder = "/".join(rel.split("/")[:2])
        entry = next(
            e
            for e in json.loads((real / "rgb" / MAPPING["test"]).read_text())
            if e["output"] == folder
        )
        cat_loc = entry["input"].split("/")[2]
        return f"{cat_loc}_{stem.rsplit('_', 1)[1]}.tif"
    return stem + ".tif"


def _ids(tif: Path) -> tuple[str, str, str]:
    cat = tif.parent.parent.name
    loc, image = tif.stem.removeprefix(cat + "_").split("_")
    return cat, loc, image
