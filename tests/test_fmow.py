"""fMoW conventions: CSV reading with clear errors, paths, and the seeded selection."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from deo.data import fmow
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
