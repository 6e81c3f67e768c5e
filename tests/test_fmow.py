"""fMoW conventions: CSV reading, paths and layouts, the seeded selection, and the real formats:
where an RGB image lies (box choice checked against gsd), JPEG limits, tile dtypes."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from affine import Affine
from PIL import Image
from rasterio.crs import CRS
from rasterio.warp import transform as warp_transform

from deo.data import fmow
from deo.data.harmonise import as_dn
from deo.data.placement import place_image, read_jpeg
from deo.data.rejects import Reject, check_reject_fraction, read_rejects, write_rejects
from deo.errors import DataError

HEADER = "category,location_id,image_id,timestamp,polygon\n"
POLY = '"POLYGON ((1 2, 1 3, 2 3, 2 2, 1 2))"'


def write_csv(path: Path, rows: list[str], header: str = HEADER) -> Path:
    path.write_text(header + "".join(r + "\n" for r in rows))
    return path


def test_paths_follow_the_real_layout() -> None:
    assert (
        fmow.sentinel_relpath("train", "airport", 7, 101)
        == "train/airport/airport_7/airport_7_101.tif"
    )
    assert fmow.rgb_relpaths("val", "port", 3, 2) == (
        "val/port/port_3/port_3_2_rgb.jpg",
        "val/port/port_3/port_3_2_rgb.json",
    )
    assert fmow.has_rgb_partner(99) and not fmow.has_rgb_partner(100)
    assert fmow.is_rgb_path("x/port_3_2_rgb.json") and not fmow.is_rgb_path("x/port_3_2.tif")


def test_read_csv(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "train.csv", [f"airport,1,0,2017-01-01T00:00:00Z,{POLY}"])
    df = fmow.read_scene_csv(path, "train")
    assert list(df.columns) == ["split", *fmow.CSV_COLUMNS]
    assert df.loc[0, "location_id"] == 1 and df["image_id"].dtype == "int64"


def test_csv_missing_column_names_file_and_column(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "val.csv", ["airport,1,0,x"], header="category,location_id,image_id,timestamp\n"
    )
    with pytest.raises(DataError, match=r"val\.csv: missing column\(s\) \['polygon'\]"):
        fmow.read_scene_csv(path, "val")


def test_csv_non_integer_id_names_row(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "train.csv",
        [f"airport,1,0,t,{POLY}", f"airport,1,zero,t,{POLY}"],
    )
    with pytest.raises(DataError, match=r"train\.csv: column 'image_id' must hold integers; row 3"):
        fmow.read_scene_csv(path, "train")


def test_csv_unreadable(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"absent\.csv: unreadable CSV"):
        fmow.read_scene_csv(tmp_path / "absent.csv", "train")


def scenes(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "split": "train",
            "category": ["a", "b"] * (n // 2),
            "location_id": range(n),
            "image_id": [0, 100] * (n // 2),
            "timestamp": "t",
            "polygon": "p",
        }
    )


def test_selection_is_seeded_and_order_independent() -> None:
    df = scenes(40)
    a = fmow.select_scenes(df, 10, seed=3)
    b = fmow.select_scenes(df.sample(frac=1, random_state=1), 10, seed=3)
    c = fmow.select_scenes(df, 10, seed=4)
    pd.testing.assert_frame_equal(a, b)
    assert len(a) == 10 and not a.equals(c)
    assert a["has_partner"].tolist() == (a["image_id"] < 100).tolist()
    assert a["s2_relpath"].iloc[0].endswith(".tif")


def test_selection_keeps_all_when_fewer_and_drops_duplicates() -> None:
    df = pd.concat([scenes(6), scenes(6)])
    assert len(fmow.select_scenes(df, 100, seed=0)) == 6


def test_rejects_round_trip_and_bound(tmp_path: Path) -> None:
    rejects = [
        Reject(f"f{i}.tif", "harmonise", "truncated or corrupt GeoTIFF: x") for i in range(3)
    ]
    rejects.append(Reject("g.jpg", "harmonise", "corrupt or truncated JPEG: y"))
    write_rejects(rejects, tmp_path / "r.csv")
    assert read_rejects(tmp_path / "r.csv") == rejects
    check_reject_fraction(rejects, 8, 0.5, "store")
    with pytest.raises(
        DataError, match=r"4 of 7 inputs rejected .*3 × truncated or corrupt GeoTIFF"
    ):
        check_reject_fraction(rejects, 7, 0.5, "store")
    with pytest.raises(DataError, match="no inputs selected"):
        check_reject_fraction([], 0, 0.5, "store")


def test_rejects_table_with_wrong_columns_is_named(tmp_path: Path) -> None:
    (tmp_path / "r.csv").write_text("member,reason\nx,y\n")
    with pytest.raises(DataError, match=r"r\.csv: rejects table must have columns"):
        read_rejects(tmp_path / "r.csv")


# --- real layouts: test_gt folders and fMoW-RGB's obfuscated test folders ----------------------


def test_split_folder_differs_from_split_name() -> None:
    assert (
        fmow.sentinel_relpath("test", "port", 3, 2, "test_gt") == "test_gt/port/port_3/port_3_2.tif"
    )
    df = scenes(4).assign(split=["test", "train"] * 2)
    chosen = fmow.select_scenes(df, 10, seed=0, folders={"test": "test_gt"})
    for row in chosen.itertuples():
        folder = "test_gt" if row.split == "test" else "train"
        assert (
            row.s2_relpath.startswith(f"{folder}/{row.category}/")
            and row.split in df["split"].values
        )


def test_rgb_test_mapping_names_obfuscated_folders(tmp_path: Path) -> None:
    entries = [
        {"input": "test_gt/port/port_3", "output": "test/0011978"},
        {"input": "test_gt/airport/airport_0", "output": "test/0000007"},
    ]
    (tmp_path / "test_gt_mapping.json").write_text(json.dumps(entries))
    layout = fmow.RgbLayout.load(tmp_path, {"test": "test_gt_mapping.json"})
    assert layout.relpaths("test", "port", 3, 2) == (
        "test/0011978/0011978_2_rgb.jpg",
        "test/0011978/0011978_2_rgb.json",
    )
    assert layout.relpaths("test", "port", 4, 0) is None  # not in the mapping: no partner
    assert layout.relpaths("train", "port", 3, 2) == fmow.rgb_relpaths("train", "port", 3, 2)


@pytest.mark.parametrize(
    "text",
    ['{"input": "a"}', '[{"input": "test_gt/port", "output": "test/1"}]', "[{"],
)
def test_malformed_mapping_is_named(tmp_path: Path, text: str) -> None:
    (tmp_path / "m.json").write_text(text)
    with pytest.raises(DataError, match=r"m\.json: "):
        fmow.read_test_mapping(tmp_path / "m.json")


# --- placement: which box is the object, checked against the image's gsd -----------------------

UTM = CRS.from_epsg(32633)
GSD, WIDTH, HEIGHT = 0.5, 2000, 1500
X0, Y0 = 500_000.0, 5_800_000.0  # the image's top-left corner, on zone 33's central meridian
OBJECT_BOX = [800, 600, 300, 200]


def envelope_wkt(x: tuple[float, float], y: tuple[float, float]) -> str:
    """The lon/lat envelope of a UTM rectangle, as fMoW's WKT."""
    lon, lat = warp_transform(UTM, "EPSG:4326", [x[0], x[1], x[1], x[0]], [y[0], y[0], y[1], y[1]])
    w, e, s, n = min(lon), max(lon), min(lat), max(lat)
    return f"POLYGON (({w} {n}, {e} {n}, {e} {s}, {w} {s}, {w} {n}))"


def box_ground(box: list[float]) -> tuple[tuple[float, float], tuple[float, float]]:
    x, y, w, h = box
    return (X0 + x * GSD, X0 + (x + w) * GSD), (Y0 - y * GSD, Y0 - (y + h) * GSD)


OBJECT_WKT = envelope_wkt(*box_ground(OBJECT_BOX))
FOOTPRINT_WKT = envelope_wkt(*box_ground([0, 0, WIDTH, HEIGHT]))
TRUTH = Affine(GSD, 0, X0, 0, -GSD, Y0)


def meta(boxes: list[dict], gsd: float = GSD) -> dict:
    return {"gsd": gsd, "img_width": WIDTH, "img_height": HEIGHT, "bounding_boxes": boxes}


def corner_error_m(affine: Affine) -> float:
    """Largest distance (m) between where ``affine`` and the truth put the image's corners."""
    corners = [(0, 0), (WIDTH, 0), (WIDTH, HEIGHT), (0, HEIGHT)]
    return max(math.dist(affine @ c, TRUTH @ c) for c in corners)


def naive_fit(box: list[float], wkt: str) -> Affine:
    """The old placement, written out: four box corners onto one polygon's envelope."""
    lon, lat = (np.array(v) for v in zip(*re.findall(r"([-\d.]+) ([-\d.]+)", wkt), strict=True))
    lon, lat = lon.astype(float), lat.astype(float)
    gx, gy = warp_transform(
        "EPSG:4326",
        UTM,
        [lon.min(), lon.max(), lon.max(), lon.min()],
        [lat.max(), lat.max(), lat.min(), lat.min()],
    )
    x, y, w, h = box
    a = np.array([[x, y, 1], [x + w, y, 1], [x + w, y + h, 1], [x, y + h, 1]], dtype=float)
    cx, *_ = np.linalg.lstsq(a, np.array(gx), rcond=None)
    cy, *_ = np.linalg.lstsq(a, np.array(gy), rcond=None)
    return Affine(cx[0], cx[1], cx[2], cy[0], cy[1], cy[2])


OBJECT = {"box": OBJECT_BOX, "ID": 17, "category": "port"}


@pytest.mark.parametrize(
    ("boxes", "csv_polygon", "chosen"),
    [
        ([{**OBJECT, "raw_location": OBJECT_WKT}], None, "bounding_boxes[0] (ID 17)"),
        (
            [
                {"box": [0, 0, WIDTH, HEIGHT], "ID": -1, "raw_location": FOOTPRINT_WKT},
                {**OBJECT, "raw_location": OBJECT_WKT},
            ],
            None,
            None,  # both entries are right: either may win
        ),
        ([{**OBJECT, "raw_location": FOOTPRINT_WKT}], None, "whole image"),
        ([OBJECT], OBJECT_WKT, "bounding_boxes[0] (ID 17)"),
        ([{"box": [0, 0, 1, 1], "ID": -1}, OBJECT], OBJECT_WKT, "bounding_boxes[1] (ID 17)"),
    ],
    ids=["object", "id_minus_one_first", "footprint_location", "no_location", "tiny_first_box"],
)
def test_placement_uses_the_pairing_that_agrees_with_gsd(boxes, csv_polygon, chosen) -> None:
    placed = place_image(meta(boxes), Path("m.json"), UTM, csv_polygon, 0.25)
    assert placed is not None
    assert corner_error_m(placed.transform) < 2 * GSD
    if chosen is not None:
        assert placed.info["rgb_box"] == chosen
    assert placed.info["rgb_gsd_ratio"] == pytest.approx(1.0, abs=0.01)


def test_the_old_first_box_choice_is_far_off_where_the_polygon_is_the_footprint() -> None:
    """What the gsd check prevents: the object box fitted to the image footprint fits its own
    corners exactly, yet scales the image by W/w and shifts it by hundreds of metres."""
    wrong = naive_fit(OBJECT_BOX, FOOTPRINT_WKT)
    assert corner_error_m(wrong) > 500
    assert math.hypot(wrong.a, wrong.d) / GSD == pytest.approx(WIDTH / OBJECT_BOX[2], rel=0.01)


def test_no_pairing_agreeing_with_gsd_is_rejected_with_numbers() -> None:
    boxes = [{**OBJECT, "raw_location": OBJECT_WKT}]
    with pytest.raises(DataError, match=r"m\.json: no bounding box agrees with gsd 2\.0 m"):
        place_image(meta(boxes, gsd=2.0), Path("m.json"), UTM, None, 0.25)
    assert place_image(meta(boxes, gsd=0.6), Path("m.json"), UTM, None, 0.25) is not None


def test_without_any_polygon_there_is_no_placement() -> None:
    assert place_image(meta([OBJECT]), Path("m.json"), UTM, None, 0.25) is None
    with pytest.raises(DataError, match=r"bounding_boxes\[1\]\.box must be"):
        place_image(meta([OBJECT, {"box": "x"}]), Path("m.json"), UTM, OBJECT_WKT, 0.25)


# --- JPEGs: a configured pixel cap instead of PIL's, reduced decoding --------------------------


def write_jpeg(path: Path, width: int, height: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 255, size=(height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    image = np.repeat(np.repeat(coarse, 16, axis=0), 16, axis=1)[:height, :width]
    Image.fromarray(image).save(path, quality=95)
    return image


def test_pixel_cap_replaces_pils_limit(tmp_path: Path, monkeypatch) -> None:
    jpg = tmp_path / "big_rgb.jpg"
    write_jpeg(jpg, 320, 240)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL alone refuses past 2000 px
    with pytest.raises(Image.DecompressionBombError):
        Image.open(jpg)
    pixels = read_jpeg(jpg, 1, max_pixels=320 * 240)
    assert pixels.data.shape == (3, 240, 320) and Image.MAX_IMAGE_PIXELS == 1000
    with pytest.raises(DataError, match=r"big_rgb\.jpg: image of 320 x 240 = 76800 px exceeds"):
        read_jpeg(jpg, 1, max_pixels=320 * 240 - 1)


def test_reduced_decode_matches_block_means_of_the_full_image(tmp_path: Path) -> None:
    jpg = tmp_path / "r.jpg"
    write_jpeg(jpg, 512, 384)
    full = read_jpeg(jpg, 1, 10**6)
    reduced = read_jpeg(jpg, 4, 10**6)
    assert reduced.scale == 4 and reduced.full_size == (512, 384)
    assert reduced.data.shape == (3, 96, 128)
    blocks = full.data.reshape(3, 96, 4, 128, 4).astype(float).mean(axis=(2, 4))
    error = np.abs(blocks - reduced.data).mean()
    shifted = np.abs(blocks[..., 1:] - reduced.data[..., :-1]).mean()  # one pixel off
    assert error < 6 and shifted > 3 * error


# --- Sentinel tiles: uint16 or float32 DNs --------------------------------------------------------


def test_float_tiles_hold_dns_and_reflectance_scale_is_refused() -> None:
    dn = np.array([[0.0, 1234.4, 1234.6], [np.nan, 70000.0, -5.0]], dtype=np.float32)
    np.testing.assert_array_equal(
        as_dn(dn, Path("t.tif")), np.array([[0, 1234, 1235], [0, 65535, 0]], dtype=np.uint16)
    )
    ints = np.array([-3, 7, 70000], dtype=np.int32)
    np.testing.assert_array_equal(as_dn(ints, Path("t.tif")), [0, 7, 65535])
    with pytest.raises(
        DataError,
        match=r"t\.tif: float tile on the reflectance scale: values within \[0\.01, 0\.9\]",
    ):
        as_dn(np.array([0.01, 0.9], dtype=np.float32), Path("t.tif"))
