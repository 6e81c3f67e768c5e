"""Harmonisation of one scene: grids, crops, padding, reprojection, validation, RGB registration."""

from __future__ import annotations

import json
import math
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.transform import from_origin
from rasterio.warp import transform

from deo.config import HarmoniseConfig, MirrorConfig, SentinelSource
from deo.data.bands import MS_BANDS, SENTINEL2_BANDS, file_index
from deo.data.harmonise import TargetGrid, read_rgb, read_s2
from deo.data.mirror import write_mirror
from deo.errors import DataError

MS_FILE_INDEX = [file_index(b) for b in MS_BANDS]
NEAREST = {"10": "nearest", "20": "nearest", "60": "nearest"}


def write_tif(path: Path, data: np.ndarray, crs: str, geo: Affine) -> Path:
    count, height, width = data.shape
    profile = dict(driver="GTiff", width=width, height=height, count=count, dtype=data.dtype.name)
    with rasterio.open(path, "w", crs=crs, transform=geo, **profile) as dst:
        dst.write(data)
    return path


def known_values(height: int, width: int) -> np.ndarray:
    """13 bands of distinct, non-zero values: band b, row r, col c → unique per pixel."""
    rows, cols = np.mgrid[0:height, 0:width]
    base = (rows * 7 + cols * 3) % 4000 + 1
    return np.stack([base + 4000 * (b % 13) for b in range(len(SENTINEL2_BANDS))]).astype(np.uint16)


def test_larger_utm_scene_is_the_exact_centre_crop(tmp_path: Path) -> None:
    data = known_values(260, 300)
    geo = from_origin(500_000, 6_000_000, 10, 10)
    path = write_tif(tmp_path / "big.tif", data, "EPSG:32633", geo)
    out, grid, info = read_s2(path, HarmoniseConfig(tile_size=224))
    assert out.dtype == np.uint16 and out.shape == (10, 224, 224)
    expected = data[MS_FILE_INDEX][:, (260 - 224) // 2 :, (300 - 224) // 2 :][:, :224, :224]
    np.testing.assert_array_equal(out, expected)
    assert grid.crs.to_epsg() == 32633 and grid.size == 224
    assert grid.transform == from_origin(500_000 + 380, 6_000_000 - 180, 10, 10)
    assert info["nodata_fraction"] == 0 and info["utm_epsg"] is None
    assert info["src_res_m"] == [10.0, 10.0] and info["src_shape"] == [260, 300]


def test_smaller_scene_is_padded_with_nodata(tmp_path: Path) -> None:
    data = known_values(80, 100)
    path = write_tif(
        tmp_path / "small.tif", data, "EPSG:32756", from_origin(300_000, 6_200_000, 10, 10)
    )
    cfg = HarmoniseConfig(tile_size=128, max_nodata_fraction=0.6)
    out, _, info = read_s2(path, cfg)
    top, left = (128 - 80) // 2, (128 - 100) // 2
    np.testing.assert_array_equal(out[:, top : top + 80, left : left + 100], data[MS_FILE_INDEX])
    padding = np.ones((128, 128), bool)
    padding[top : top + 80, left : left + 100] = False
    assert np.all(out[:, padding] == cfg.nodata)
    assert info["nodata_fraction"] == pytest.approx(1 - 80 * 100 / 128**2, abs=1e-6)
    with pytest.raises(DataError, match=r"mostly nodata scene: 51% of pixels are nodata") as err:
        read_s2(path, HarmoniseConfig(tile_size=128, max_nodata_fraction=0.5))
    assert err.value.path == str(path)


def test_20m_source_gives_twice_the_pixels_over_the_same_ground(tmp_path: Path) -> None:
    ramp = np.broadcast_to(1000 + 20 * np.arange(60, dtype=np.uint16), (13, 60, 60))
    geo = from_origin(400_000, 5_000_000, 20, 20)
    path = write_tif(tmp_path / "coarse.tif", np.ascontiguousarray(ramp), "EPSG:32631", geo)

    out, grid, _ = read_s2(path, HarmoniseConfig(tile_size=120, resampling=NEAREST))
    assert out.shape == (10, 120, 120)
    assert grid.transform @ (0, 0) == geo @ (0, 0) and grid.transform @ (120, 120) == geo @ (60, 60)
    np.testing.assert_array_equal(
        out, np.repeat(np.repeat(ramp[MS_FILE_INDEX], 2, axis=1), 2, axis=2)
    )

    bilinear, _, _ = read_s2(path, HarmoniseConfig(tile_size=120))
    j = np.arange(1, 119)  # bilinear of a linear ramp at 10 m pixel centres, away from the edges
    np.testing.assert_array_equal(
        bilinear[:, :, 1:119], np.broadcast_to(995 + 10 * j, (10, 120, 118))
    )


@pytest.mark.parametrize(("lon", "lat"), [(13.4, 52.5), (151.2, -33.9), (-70.6, -33.4)])
def test_geographic_source_goes_to_its_utm_zone(tmp_path: Path, lon: float, lat: float) -> None:
    res_lon, res_lat = 10 / (111_320 * math.cos(math.radians(lat))), 10 / 110_574
    geo = from_origin(lon - 40 * res_lon, lat + 40 * res_lat, res_lon, res_lat)
    path = write_tif(tmp_path / "geo.tif", known_values(80, 80), "EPSG:4326", geo)
    out, grid, info = read_s2(path, HarmoniseConfig(tile_size=64))
    zone = math.floor((lon + 180) / 6) + 1
    expected = (32600 if lat >= 0 else 32700) + zone
    assert grid.crs.to_epsg() == expected and info["utm_epsg"] == expected
    assert grid.transform.a == 10 and grid.transform.e == -10
    (clon,), (clat,) = transform(grid.crs, "EPSG:4326", [grid.centre[0]], [grid.centre[1]])
    assert abs(clon - lon) * 111_320 * math.cos(math.radians(lat)) < 10
    assert abs(clat - lat) * 110_574 < 10
    assert info["nodata_fraction"] < 0.02 and np.all(out.reshape(10, -1).max(axis=0) > 0)
    assert info["src_res_m"] == pytest.approx([10, 10], rel=0.01)


# --- on the synthetic mirror ------------------------------------------------------------

SOURCE = SentinelSource()
TILE = HarmoniseConfig(tile_size=48, max_nodata_fraction=0.9)


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[dict]]:
    """(Sentinel scene root, RGB root, bad inputs) of a freshly written default mirror."""
    out = tmp_path_factory.mktemp("mirror")
    summary = write_mirror(
        MirrorConfig(locations_per_category=2),
        out,
        csvs=SOURCE.csvs,
        archive=SOURCE.archive,
        archive_prefix=SOURCE.archive_prefix,
    )
    with tarfile.open(out / "sentinel" / SOURCE.archive) as tar:
        tar.extractall(out / "scenes", filter="data")
    return out / "scenes" / SOURCE.archive_prefix, out / "rgb", summary.bad_inputs


TIF_KINDS = {"truncated_tif", "wrong_band_count", "wrong_dtype", "all_nodata", "missing_tif"}
EXPECTED_PROBLEM = {
    "truncated_tif": "truncated or corrupt GeoTIFF",
    "wrong_band_count": r"expected 13 bands \(B01..B12\), found 12",
    "wrong_dtype": "float32",
    "all_nodata": "all-nodata or mostly nodata scene: 100% of pixels are nodata",
    "missing_tif": "file not found",
    "corrupt_jpeg": "corrupt or truncated JPEG",
    "bad_json": "unreadable JSON",
    "missing_rgb": "file not found",
}


def test_each_bad_input_kind_raises_a_data_error_naming_file_and_problem(mirror) -> None:
    scenes, rgb_root, bad = mirror
    assert sorted(b["kind"] for b in bad) == sorted(EXPECTED_PROBLEM)
    for entry in bad:
        kind = entry["kind"]
        if kind in TIF_KINDS:
            path = scenes / entry["path"]
            with pytest.raises(DataError, match=EXPECTED_PROBLEM[kind]) as err:
                read_s2(path, TILE)
        else:
            path = rgb_root / entry["path"]
            stem = str(path).rsplit("_rgb.", 1)[0]
            with pytest.raises(DataError, match=EXPECTED_PROBLEM[kind]) as err:
                read_rgb(Path(stem + "_rgb.jpg"), Path(stem + "_rgb.json"), _grid(), TILE)
        assert err.value.path == str(path), kind
        assert str(path) in str(err.value)


def _grid() -> TargetGrid:
    return TargetGrid(rasterio.crs.CRS.from_epsg(32633), from_origin(0, 0, 10, 10), 48)


def _good_partner_scenes(mirror) -> list[tuple[Path, Path, Path]]:
    """(tif, jpg, json) of every scene with a partner whose files the mirror left intact."""
    scenes, rgb_root, bad = mirror
    broken = {re.sub(r"(_rgb\.jpg|_rgb\.json|\.tif)$", "", b["path"]) for b in bad}
    found = []
    for tif in sorted(scenes.rglob("*.tif")):
        stem = tif.relative_to(scenes).with_suffix("").as_posix()
        if int(stem.rsplit("_", 1)[1]) < 100 and stem not in broken:
            found.append((tif, rgb_root / f"{stem}_rgb.jpg", rgb_root / f"{stem}_rgb.json"))
    return found


def _pearson(rgb: np.ndarray, s2: np.ndarray) -> float:
    """Mean over R, G, B of Pearson r with S2 B04, B03, B02 where both have data."""
    both = (rgb.max(axis=0) > 0) & (s2.max(axis=0) > 0)
    pairs = zip(rgb, (s2[MS_BANDS.index(b)] for b in ("B04", "B03", "B02")), strict=True)
    return float(np.mean([np.corrcoef(c[both], b[both])[0, 1] for c, b in pairs]))


def test_registered_rgb_correlates_with_sentinel_and_a_shift_does_not(mirror, tmp_path) -> None:
    good, shifted = [], []
    for tif, jpg, meta_json in _good_partner_scenes(mirror):
        s2, grid, _ = read_s2(tif, TILE)
        rgb, info = read_rgb(jpg, meta_json, grid, TILE)
        assert info["rgb_registration"] == "gcp-affine" and info["rgb_polygon_source"] == "json"
        assert info["rgb_res_m"] == pytest.approx(info["rgb_gsd_json_m"], rel=0.08)
        meta = json.loads(meta_json.read_text())
        box = meta["bounding_boxes"][0]["box"]
        box[0] += 100 / meta["gsd"]  # the box moved by 100 m east and south: a wrong registration
        box[1] += 100 / meta["gsd"]
        wrong = tmp_path / "shifted.json"
        wrong.write_text(json.dumps(meta))
        good.append(_pearson(rgb, s2))
        shifted.append(_pearson(read_rgb(jpg, wrong, grid, TILE)[0], s2))
    good_r, shifted_r = np.array(good), np.array(shifted)
    assert len(good_r) >= 12
    assert np.mean(good_r > 0.7) >= 0.9 and np.median(good_r) > 0.9
    assert np.all(good_r - shifted_r > 0.3)


def test_csv_polygon_registers_as_well_and_no_polygon_falls_back(mirror, tmp_path) -> None:
    tif, jpg, meta_json = _good_partner_scenes(mirror)[0]
    s2, grid, _ = read_s2(tif, TILE)
    from_json, _ = read_rgb(jpg, meta_json, grid, TILE)
    meta = json.loads(meta_json.read_text())
    polygon = meta["bounding_boxes"][0].pop("raw_location")
    bare = tmp_path / "no_polygon.json"
    bare.write_text(json.dumps(meta))

    from_csv, info = read_rgb(jpg, bare, grid, TILE, polygon_wkt=polygon)
    assert info["rgb_registration"] == "gcp-affine" and info["rgb_polygon_source"] == "csv"
    np.testing.assert_array_equal(from_csv, from_json)

    fallback, info = read_rgb(jpg, bare, grid, TILE)
    assert info["rgb_registration"] == "gsd-centred"
    covered = fallback.max(axis=0) > 0
    footprint_px = meta["img_width"] * meta["img_height"] * meta["gsd"] ** 2 / TILE.gsd_m**2
    assert covered.sum() == pytest.approx(min(footprint_px, TILE.tile_size**2), rel=0.1)
    rows, cols = np.nonzero(covered)
    assert abs(rows.mean() - 23.5) < 1.5 and abs(cols.mean() - 23.5) < 1.5
    assert _pearson(fallback, s2) < _pearson(from_json, s2)


def test_rgb_metadata_problems_name_the_file(mirror, tmp_path) -> None:
    _, jpg, meta_json = _good_partner_scenes(mirror)[0]
    meta = json.loads(meta_json.read_text())
    del meta["gsd"]
    no_gsd = tmp_path / "no_gsd.json"
    no_gsd.write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"missing key\(s\) \['gsd'\]") as err:
        read_rgb(jpg, no_gsd, _grid(), TILE)
    assert err.value.path == str(no_gsd)

    truncated = tmp_path / "truncated_rgb.jpg"
    blob = jpg.read_bytes()
    truncated.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="corrupt or truncated JPEG") as err:
        read_rgb(truncated, meta_json, _grid(), TILE)
    assert err.value.path == str(truncated)
