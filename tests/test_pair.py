"""Pairing: scenes joined with RGB partners by stem; every outcome counted or rejected."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from deo.data import fmow
from deo.data.pair import pair_scenes


def make_selection() -> pd.DataFrame:
    df = pd.DataFrame(
        {
            "split": "train",
            "category": "port",
            "location_id": [1, 1, 1, 2, 2],
            "image_id": [0, 1, 100, 0, 1],
            "timestamp": "t",
            "polygon": "p",
        }
    )
    return fmow.select_scenes(df, 100, seed=0)


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def test_pairing_outcomes(tmp_path: Path) -> None:
    sel = make_selection()
    s2_root, rgb_root = tmp_path / "s2", tmp_path / "rgb"
    for rel in [*sel["s2_relpath"][sel["location_id"] != 2], sel["s2_relpath"].iloc[3]]:
        touch(s2_root / rel)  # port_2_1.tif is absent
    for loc, img in [(1, 0)]:
        for rel in fmow.rgb_relpaths("train", "port", loc, img):
            touch(rgb_root / rel)
    jpg_1_1, _ = fmow.rgb_relpaths("train", "port", 1, 1)
    touch(rgb_root / jpg_1_1)  # json of (1, 1) missing; (2, 0) partner failed to download
    failed_jpg, failed_json = fmow.rgb_relpaths("train", "port", 2, 0)
    failures = {
        str(rgb_root / failed_jpg): "partner download failed: HTTP 404",
        str(rgb_root / failed_json): "partner download failed: HTTP 404",
    }
    result = pair_scenes(sel, s2_root, rgb_root, failures)
    p = result.pairs
    status = dict(zip(zip(p.location_id, p.image_id, strict=True), p.pairing, strict=True))
    assert status == {
        (1, 0): "paired",
        (1, 1): "partner_missing",
        (1, 100): "ms_only_by_design",
        (2, 0): "partner_missing",
    }
    assert result.counts == {
        "paired": 1,
        "partner_missing": 2,
        "ms_only_by_design": 1,
        "rejected_missing_tif": 1,
    }
    reasons = {Path(r.path).name: r.reason for r in result.rejects}
    assert reasons == {
        "port_2_1.tif": "file listed in the CSV is absent",
        "port_1_1_rgb.json": "partner file absent",
        "port_2_0_rgb.jpg": "partner download failed: HTTP 404",
        "port_2_0_rgb.json": "partner download failed: HTTP 404",
    }
    assert result.pairs["order"].tolist() == [0, 1, 2, 3]
    paired = result.pairs[result.pairs.pairing == "paired"].iloc[0]
    assert paired.rgb_jpg.endswith("port_1_0_rgb.jpg") and Path(paired.s2_path).is_file()
    assert result.pairs[result.pairs.pairing != "paired"]["rgb_jpg"].isna().all()


def test_ms_only_store_needs_no_partners(tmp_path: Path) -> None:
    sel = make_selection()
    for rel in sel["s2_relpath"]:
        touch(tmp_path / rel)
    result = pair_scenes(sel, tmp_path, None)
    assert set(result.pairs.pairing) == {"ms_only_configured"} and not result.rejects


def test_mapped_test_split_pairs_through_obfuscated_folders(tmp_path: Path) -> None:
    df = pd.DataFrame(
        {
            "split": "test",
            "category": "port",
            "location_id": [1, 1, 2],
            "image_id": [0, 1, 0],
            "timestamp": "t",
            "polygon": "p",
        }
    )
    sel = fmow.select_scenes(df, 100, seed=0, folders={"test": "test_gt"})
    for rel in sel["s2_relpath"]:
        touch(tmp_path / "s2" / rel)
    layout = fmow.RgbLayout({"test": {("port", "port_1"): "test/0004242"}})
    for image_id in (0, 1):
        for rel in layout.relpaths("test", "port", 1, image_id):
            touch(tmp_path / "rgb" / rel)
    result = pair_scenes(sel, tmp_path / "s2", tmp_path / "rgb", layout=layout)
    p = result.pairs.set_index(["location_id", "image_id"])
    assert p.loc[(1, 0), "pairing"] == "paired" and p.loc[(2, 0), "pairing"] == "partner_unmapped"
    assert p.loc[(1, 1), "rgb_jpg"].endswith("test/0004242/0004242_1_rgb.jpg")
    assert p.loc[(1, 0), "s2_path"].endswith("test_gt/port/port_1/port_1_0.tif")
    assert not result.rejects and result.counts == {"paired": 2, "partner_unmapped": 1}
