"""Harmonisation of one scene: tiling policies, reprojection, validation, the aerial partner at
its own resolution, and the co-registration check."""

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
from PIL import Image
from rasterio.transform import from_origin
from rasterio.warp import transform

from deo.config import HarmoniseConfig, MirrorConfig, SentinelSource
from deo.data.bands import MS_BANDS, SENTINEL2_BANDS, file_index
from deo.data.coreg import RADIUS, box_sum, coreg_score
from deo.data.harmonise import TargetGrid, read_rgb, read_s2, rgb_coverage
from deo.data.mirror import write_mirror
from deo.errors import DataError

MS_FILE_INDEX = [file_index(b) for b in MS_BANDS]
NEAREST = {"10": "nearest", "20": "nearest", "60": "nearest"}
AVERAGE = {"10": "average", "20": "average", "60": "average"}
FIXED = "fixed_gsd"


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
    out, grid, info = read_s2(path, HarmoniseConfig(tile_size=224, tiling=FIXED))
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
    cfg = HarmoniseConfig(tile_size=128, tiling=FIXED, max_nodata_fraction=0.6)
    out, _, info = read_s2(path, cfg)
    top, left = (128 - 80) // 2, (128 - 100) // 2
    np.testing.assert_array_equal(out[:, top : top + 80, left : left + 100], data[MS_FILE_INDEX])
    padding = np.ones((128, 128), bool)
    padding[top : top + 80, left : left + 100] = False
    assert np.all(out[:, padding] == cfg.nodata)
    assert info["nodata_fraction"] == pytest.approx(1 - 80 * 100 / 128**2, abs=1e-6)
    with pytest.raises(DataError, match=r"mostly nodata scene: 51% of pixels are nodata") as err:
        read_s2(path, HarmoniseConfig(tile_size=128, tiling=FIXED, max_nodata_fraction=0.5))
    assert err.value.path == str(path)


def test_20m_source_gives_twice_the_pixels_over_the_same_ground(tmp_path: Path) -> None:
    ramp = np.broadcast_to(1000 + 20 * np.arange(60, dtype=np.uint16), (13, 60, 60))
    geo = from_origin(400_000, 5_000_000, 20, 20)
    path = write_tif(tmp_path / "coarse.tif", np.ascontiguousarray(ramp), "EPSG:32631", geo)

    out, grid, _ = read_s2(path, HarmoniseConfig(tile_size=120, tiling=FIXED, resampling=NEAREST))
    assert out.shape == (10, 120, 120)
    assert grid.transform @ (0, 0) == geo @ (0, 0) and grid.transform @ (120, 120) == geo @ (60, 60)
    np.testing.assert_array_equal(
        out, np.repeat(np.repeat(ramp[MS_FILE_INDEX], 2, axis=1), 2, axis=2)
    )

    bilinear, _, _ = read_s2(path, HarmoniseConfig(tile_size=120, tiling=FIXED))
    j = np.arange(1, 119)  # bilinear of a linear ramp at 10 m pixel centres, away from the edges
    np.testing.assert_array_equal(
        bilinear[:, :, 1:119], np.broadcast_to(995 + 10 * j, (10, 120, 118))
    )


@pytest.mark.parametrize(("lon", "lat"), [(13.4, 52.5), (151.2, -33.9), (-70.6, -33.4)])
def test_geographic_source_goes_to_its_utm_zone(tmp_path: Path, lon: float, lat: float) -> None:
    res_lon, res_lat = 10 / (111_320 * math.cos(math.radians(lat))), 10 / 110_574
    geo = from_origin(lon - 40 * res_lon, lat + 40 * res_lat, res_lon, res_lat)
    path = write_tif(tmp_path / "geo.tif", known_values(80, 80), "EPSG:4326", geo)
    out, grid, info = read_s2(path, HarmoniseConfig(tile_size=64, tiling=FIXED))
    zone = math.floor((lon + 180) / 6) + 1
    expected = (32600 if lat >= 0 else 32700) + zone
    assert grid.crs.to_epsg() == expected and info["utm_epsg"] == expected
    assert grid.transform.a == 10 and grid.transform.e == -10
    (clon,), (clat,) = transform(grid.crs, "EPSG:4326", [grid.centre[0]], [grid.centre[1]])
    assert abs(clon - lon) * 111_320 * math.cos(math.radians(lat)) < 10
    assert abs(clat - lat) * 110_574 < 10
    assert info["nodata_fraction"] < 0.02 and np.all(out.reshape(10, -1).max(axis=0) > 0)
    assert info["src_res_m"] == pytest.approx([10, 10], rel=0.01)


def test_resize_puts_the_whole_scene_on_the_tile(tmp_path: Path) -> None:
    data = known_values(128, 128)
    geo = from_origin(500_000, 6_000_000, 10, 10)
    path = write_tif(tmp_path / "square.tif", data, "EPSG:32633", geo)
    out, grid, info = read_s2(path, HarmoniseConfig(tile_size=64, resampling=AVERAGE))
    assert grid.transform == from_origin(500_000, 6_000_000, 20, 20) and grid.gsd_m_eff == 20
    blocks = data[MS_FILE_INDEX].reshape(10, 64, 2, 64, 2).astype(np.float64).mean(axis=(2, 4))
    assert np.abs(out - blocks).max() <= 0.5  # each pixel the mean of its 2 × 2 source pixels
    assert info["tiling"] == "resize" and info["gsd_m_eff"] == 20

    path = write_tif(tmp_path / "oblong.tif", known_values(80, 100), "EPSG:32633", geo)
    _, grid, _ = read_s2(path, HarmoniseConfig(tile_size=40))
    assert grid.bounds == (500_000, 6_000_000 - 800, 500_000 + 1000, 6_000_000)
    assert (grid.transform.a, grid.transform.e) == (25, -20)
    assert grid.gsd_m_eff == pytest.approx(math.sqrt(25 * 20))


@pytest.mark.parametrize(("height", "width"), [(10, 10), (10, 37), (600, 450)])
def test_resize_keeps_scenes_of_any_size(tmp_path: Path, height: int, width: int) -> None:
    lon, lat = 28.05, -26.2
    res_lon, res_lat = 10 / (111_320 * math.cos(math.radians(lat))), 10 / 110_574
    geo = from_origin(lon, lat, res_lon, res_lat)
    path = write_tif(tmp_path / "scene.tif", known_values(height, width), "EPSG:4326", geo)
    out, grid, info = read_s2(path, HarmoniseConfig(tile_size=64))
    assert out.shape == (10, 64, 64) and info["nodata_fraction"] < 0.03
    left, bottom, right, top = grid.bounds
    assert right - left == pytest.approx(10 * width, rel=0.01)
    assert top - bottom == pytest.approx(10 * height, rel=0.01)
    assert info["gsd_m_eff"] == pytest.approx(10 * math.sqrt(height * width) / 64, rel=0.01)
    fixed = HarmoniseConfig(tile_size=224, tiling=FIXED)
    if height * width < 224**2 / 2:
        with pytest.raises(DataError, match="mostly nodata scene"):
            read_s2(path, fixed)
    else:
        assert read_s2(path, fixed)[1].gsd_m_eff == 10


def test_resize_loses_no_mirror_scene_of_10_to_600_px(tmp_path: Path) -> None:
    cfg = MirrorConfig(
        categories=("airport", "port"),
        locations_per_category=2,
        images_per_location=2,
        ms_only_images_per_location=0,
        size_px=(10, 600),
        bad_inputs=False,
    )
    source = SentinelSource()
    write_mirror(
        cfg,
        tmp_path,
        csvs=source.csvs,
        archive=source.archive,
        archive_prefix=source.archive_prefix,
    )
    with tarfile.open(tmp_path / "sentinel" / source.archive) as tar:
        tar.extractall(tmp_path / "scenes", filter="data")
    tifs = sorted((tmp_path / "scenes").rglob("*.tif"))
    shapes = []
    for tif in tifs:
        with rasterio.open(tif) as src:
            shapes.append(src.shape)
    assert len(tifs) == 8 and min(map(min, shapes)) < 100 and max(map(max, shapes)) > 400
    fixed_rejects = 0
    for tif in tifs:
        out, _, info = read_s2(tif, HarmoniseConfig(tile_size=64))
        assert out.shape == (10, 64, 64) and info["nodata_fraction"] < 0.05
        try:
            read_s2(tif, HarmoniseConfig(tile_size=224, tiling=FIXED))
        except DataError:
            fixed_rejects += 1
    assert fixed_rejects >= 1  # what the old cut/pad policy loses


def _checkerboard_partner(tmp_path: Path, square_px: int) -> tuple[Path, Path]:
    """A 400 × 400 px, 1 m JPEG of black and white squares, placed by its gsd (no boxes)."""
    rows, cols = np.mgrid[0:400, 0:400]
    board = (((rows // square_px) + (cols // square_px)) % 2 * 255).astype(np.uint8)
    jpg, meta = tmp_path / "board_rgb.jpg", tmp_path / "board_rgb.json"
    Image.fromarray(np.stack([board] * 3, axis=-1)).save(jpg, quality=95)
    fields = {"gsd": 1.0, "img_width": 400, "img_height": 400, "bounding_boxes": []}
    meta.write_text(json.dumps(fields))
    return jpg, meta


def test_rgb_keeps_its_detail_over_the_tile_footprint(tmp_path: Path) -> None:
    jpg, meta = _checkerboard_partner(tmp_path, square_px=5)
    grid = TargetGrid(rasterio.crs.CRS.from_epsg(32633), from_origin(0, 800, 20, 20), 40)
    cfg = HarmoniseConfig(tile_size=40, rgb_tile_size=320)
    rgb, info = read_rgb(jpg, meta, grid, cfg)
    assert rgb.shape == (3, 320, 320) and rgb.dtype == np.uint8
    assert info["rgb_gsd_m_eff"] == 2.5
    covered = rgb_coverage(grid.resized(320), Affine(*info["rgb_transform"]), (400, 400))
    # the image is centred on the 800 m footprint: 400 m = the middle 160 of 320 pixels
    expected = np.zeros((320, 320), bool)
    expected[80:240, 80:240] = True
    np.testing.assert_array_equal(covered, expected)
    inside = rgb[0][covered].astype(np.float64)
    assert inside.std() > 60  # 5 m squares survive at 2.5 m pixels
    # The same image averaged to 10 m pixels (what the store used to keep) is flat grey.
    ten_m = inside.reshape(40, 4, 40, 4).mean(axis=(1, 3))
    assert ten_m.std() < 0.15 * inside.std()
    near = np.zeros_like(covered)  # GDAL's average may leak into the next pixel at an edge
    near[79:241, 79:241] = True
    assert np.all(rgb[:, ~near] == 0)


def _local_detail_reference(x: np.ndarray, mask: np.ndarray, r: int) -> np.ndarray:
    out = np.zeros_like(x)
    for i, j in zip(*np.nonzero(mask), strict=True):
        window = (slice(max(0, i - r), i + r + 1), slice(max(0, j - r), j + r + 1))
        out[i, j] = x[i, j] - x[window][mask[window]].mean()
    return out


def test_box_sum_and_coreg_score_match_explicit_loops() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((9, 11))
    expected = np.array(
        [
            [x[max(0, i - 2) : i + 3, max(0, j - 2) : j + 3].sum() for j in range(11)]
            for i in range(9)
        ]
    )
    np.testing.assert_allclose(box_sum(x, 2), expected, atol=1e-12)

    # one grid for both (10 m pixels), so the score is the Pearson r of the local details
    grid = TargetGrid(rasterio.crs.CRS.from_epsg(32633), from_origin(0, 240, 10, 10), 24)
    s2 = rng.integers(500, 3000, size=(10, 24, 24)).astype(np.uint16)
    s2[:, :3, :] = 0  # nodata rows
    visible = s2[[MS_BANDS.index(b) for b in ("B04", "B03", "B02")]].astype(np.float64)
    luminance = visible.mean(axis=0)
    rgb = np.clip(luminance / 12 + rng.normal(0, 40, (3, 24, 24)), 0, 255).astype(np.uint8)
    covered = np.ones((24, 24), bool)
    covered[:, 20:] = False
    score, n = coreg_score(s2, grid, rgb, grid, covered, nodata=0, gsd_m=10.0)
    mask = covered & (s2.max(axis=0) > 0)
    a = _local_detail_reference(rgb.astype(np.float64).mean(axis=0), mask, RADIUS)[mask]
    b = _local_detail_reference(luminance, mask, RADIUS)[mask]
    assert n == mask.sum() == 21 * 20
    assert score == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-6)
    assert 0.3 < score < 0.9  # correlated through the noise

    flat = np.full_like(rgb, 128)
    assert math.isnan(coreg_score(s2, grid, flat, grid, covered, nodata=0, gsd_m=10.0)[0])
    corner = np.zeros_like(covered)
    corner[5:8, 5:8] = True  # 9 pixels: too few to tell
    assert coreg_score(s2, grid, rgb, grid, corner, nodata=0, gsd_m=10.0)[1] == 9
    assert math.isnan(coreg_score(s2, grid, rgb, grid, corner, nodata=0, gsd_m=10.0)[0])


# --- on the synthetic mirror ------------------------------------------------------------

SOURCE = SentinelSource()
TILE = HarmoniseConfig(tile_size=48, rgb_tile_size=96, max_nodata_fraction=0.9)
MISREGISTERED = {"misregistered_shift", "misregistered_scale"}


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
    "misregistered_shift": "",
    "misregistered_scale": "",
}


def test_each_bad_input_kind_raises_a_data_error_naming_file_and_problem(mirror) -> None:
    scenes, rgb_root, bad = mirror
    assert sorted(b["kind"] for b in bad) == sorted(EXPECTED_PROBLEM)
    for entry in bad:
        kind = entry["kind"]
        if kind in MISREGISTERED:  # well-formed files: the co-registration check rejects them
            continue
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


def _partner_scenes(mirror, kinds: set[str] | None = None) -> list[tuple[Path, Path, Path]]:
    """(tif, jpg, json) of scenes with a partner: the intact ones, or the bad ones of ``kinds``."""
    scenes, rgb_root, bad = mirror
    broken = {re.sub(r"(_rgb\.jpg|_rgb\.json|\.tif)$", "", b["path"]): b["kind"] for b in bad}
    found = []
    for tif in sorted(scenes.rglob("*.tif")):
        stem = tif.relative_to(scenes).with_suffix("").as_posix()
        kind = broken.get(stem)
        if int(stem.rsplit("_", 1)[1]) < 100 and (kind in kinds if kinds else kind is None):
            found.append((tif, rgb_root / f"{stem}_rgb.jpg", rgb_root / f"{stem}_rgb.json"))
    return found


def _score(s2: np.ndarray, grid: TargetGrid, rgb: np.ndarray, info: dict) -> float:
    tile = grid.resized(TILE.rgb_tile_size)
    covered = rgb_coverage(tile, Affine(*info["rgb_transform"]), info["rgb_src_shape"])
    return coreg_score(s2, grid, rgb, tile, covered, nodata=0, gsd_m=TILE.gsd_m)[0]


def test_registered_partners_pass_the_check_and_a_shifted_box_fails(mirror, tmp_path) -> None:
    good, shifted = [], []
    for tif, jpg, meta_json in _partner_scenes(mirror):
        s2, grid, _ = read_s2(tif, TILE)
        rgb, info = read_rgb(jpg, meta_json, grid, TILE)
        assert info["rgb_registration"] == "gcp-affine" and info["rgb_polygon_source"] == "json"
        assert info["rgb_res_m"] == pytest.approx(info["rgb_gsd_json_m"], rel=0.08)
        assert rgb.shape == (3, 96, 96) and info["rgb_gsd_m_eff"] < 10 <= grid.gsd_m_eff + 2
        meta = json.loads(meta_json.read_text())
        box = meta["bounding_boxes"][0]["box"]
        box[0] += 100 / meta["gsd"]  # the box moved by 100 m east and south: a wrong registration
        box[1] += 100 / meta["gsd"]
        wrong = tmp_path / "shifted.json"
        wrong.write_text(json.dumps(meta))
        good.append(_score(s2, grid, rgb, info))
        shifted.append(_score(s2, grid, *read_rgb(jpg, wrong, grid, TILE)))
    good_r, shifted_r = np.array(good), np.array(shifted)
    assert len(good_r) >= 12
    assert np.all(good_r >= TILE.coreg_min_score) and np.median(good_r) > 0.8
    assert np.mean(shifted_r < TILE.coreg_min_score) >= 0.9 and np.all(good_r - shifted_r > 0.3)


def test_misregistered_mirror_partners_fail_the_check(mirror) -> None:
    misregistered = _partner_scenes(mirror, MISREGISTERED)
    assert len(misregistered) == 2
    for tif, jpg, meta_json in misregistered:
        s2, grid, _ = read_s2(tif, TILE)
        rgb, info = read_rgb(jpg, meta_json, grid, TILE)
        assert info["rgb_registration"] == "gcp-affine" and info["rgb_gcp_rmse_m"] < 1
        assert _score(s2, grid, rgb, info) < TILE.coreg_min_score, jpg


def test_csv_polygon_registers_as_well_and_no_polygon_falls_back(mirror, tmp_path) -> None:
    tif, jpg, meta_json = _partner_scenes(mirror)[0]
    s2, grid, _ = read_s2(tif, TILE)
    from_json, json_info = read_rgb(jpg, meta_json, grid, TILE)
    meta = json.loads(meta_json.read_text())
    polygon = meta["bounding_boxes"][0].pop("raw_location")
    bare = tmp_path / "no_polygon.json"
    bare.write_text(json.dumps(meta))

    from_csv, info = read_rgb(jpg, bare, grid, TILE, polygon_wkt=polygon)
    assert info["rgb_registration"] == "gcp-affine" and info["rgb_polygon_source"] == "csv"
    np.testing.assert_array_equal(from_csv, from_json)

    fallback, info = read_rgb(jpg, bare, grid, TILE)
    assert info["rgb_registration"] == "gsd-centred"
    tile = grid.resized(TILE.rgb_tile_size)
    covered = rgb_coverage(tile, Affine(*info["rgb_transform"]), info["rgb_src_shape"])
    pixel_area = tile.transform.a * -tile.transform.e
    footprint_px = meta["img_width"] * meta["img_height"] * meta["gsd"] ** 2 / pixel_area
    assert covered.sum() == pytest.approx(min(footprint_px, 96**2), rel=0.05)
    rows, cols = np.nonzero(covered)
    assert abs(rows.mean() - 47.5) < 1.5 and abs(cols.mean() - 47.5) < 1.5
    assert _score(s2, grid, fallback, info) < _score(s2, grid, from_json, json_info)


def test_rgb_metadata_problems_name_the_file(mirror, tmp_path) -> None:
    _, jpg, meta_json = _partner_scenes(mirror)[0]
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
