"""fMoW conventions: the Sentinel CSVs, the file layouts of both datasets, and pairing stems.

fMoW-Sentinel scene ``<split>/<cat>/<cat>_<loc>/<cat>_<loc>_<image_id>.tif`` and fMoW-RGB image
``<split>/<cat>/<cat>_<loc>/<cat>_<loc>_<t>_rgb.{jpg,json}`` are partners when ``image_id == t``;
fMoW-Sentinel added scenes with ``image_id >= 100`` that have no fMoW-RGB partner.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from deo.errors import DataError

CSV_COLUMNS: tuple[str, ...] = ("category", "location_id", "image_id", "timestamp", "polygon")
FIRST_MS_ONLY_IMAGE_ID = 100


def stem(split: str, category: str, location_id: int, image_id: int) -> str:
    """The path stem shared by a Sentinel scene and its RGB partner."""
    name = f"{category}_{location_id}"
    return f"{split}/{category}/{name}/{name}_{image_id}"


def sentinel_relpath(split: str, category: str, location_id: int, image_id: int) -> str:
    return stem(split, category, location_id, image_id) + ".tif"


def rgb_relpaths(split: str, category: str, location_id: int, image_id: int) -> tuple[str, str]:
    """(image, metadata) paths of the fMoW-RGB partner, relative to the fMoW-RGB root."""
    base = stem(split, category, location_id, image_id) + "_rgb"
    return base + ".jpg", base + ".json"


def is_rgb_path(path: str | Path) -> bool:
    """Whether a path names an fMoW-RGB file (image or metadata) rather than a Sentinel scene."""
    return str(path).endswith(("_rgb.jpg", "_rgb.json"))


def has_rgb_partner(image_id: int) -> bool:
    return image_id < FIRST_MS_ONLY_IMAGE_ID


def read_scene_csv(path: Path, split: str) -> pd.DataFrame:
    """Read one fMoW-Sentinel split CSV, checking its columns and types; adds ``split``."""
    try:
        df = pd.read_csv(path, dtype={"category": str, "timestamp": str, "polygon": str})
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise DataError(path, f"unreadable CSV: {e}") from e
    missing = [c for c in CSV_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(path, f"missing column(s) {missing}; expected {list(CSV_COLUMNS)}")
    for col in ("location_id", "image_id"):
        values = pd.to_numeric(df[col], errors="coerce")
        bad = values.isna() | (values != values.round())
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise DataError(
                path, f"column {col!r} must hold integers; row {row + 2} has {df[col][row]!r}"
            )
        df[col] = values.astype("int64")
    df = df[list(CSV_COLUMNS)].copy()
    df.insert(0, "split", split)
    return df


def select_scenes(scenes: pd.DataFrame, max_samples: int, seed: int) -> pd.DataFrame:
    """A seeded uniform sample of at most ``max_samples`` scenes, in a stable order.

    Sorting first makes the choice independent of CSV row order; the result keeps that sorted
    order so shard assignment and the store's row order are reproducible.
    """
    keys = ["split", "category", "location_id", "image_id"]
    ordered = scenes.sort_values(keys, kind="stable").drop_duplicates(keys).reset_index(drop=True)
    if len(ordered) > max_samples:
        ordered = ordered.sample(n=max_samples, random_state=seed).sort_values(keys, kind="stable")
    out = ordered.reset_index(drop=True)
    out["s2_relpath"] = [
        sentinel_relpath(r.split, r.category, r.location_id, r.image_id) for r in out.itertuples()
    ]
    out["has_partner"] = out["image_id"] < FIRST_MS_ONLY_IMAGE_ID
    return out
