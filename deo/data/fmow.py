"""fMoW conventions: the Sentinel CSVs, the file layouts of both datasets, and pairing stems.

fMoW-Sentinel scene ``<folder>/<cat>/<cat>_<loc>/<cat>_<loc>_<image_id>.tif`` and fMoW-RGB image
``<split>/<cat>/<cat>_<loc>/<cat>_<loc>_<t>_rgb.{jpg,json}`` are partners when ``image_id == t``;
fMoW-Sentinel added scenes with ``image_id >= 100`` that have no fMoW-RGB partner.

Real layouts that differ from the split name (SatMAE, WILDS, ssl4rs and Panopticon's readers):
fMoW-Sentinel keeps its test split in ``test_gt/`` (``data.sentinel.folders``), and fMoW-RGB's
test images sit in obfuscated folders ``test/<secret>/<secret>_<t>_rgb.jpg`` that the
challenge's ``test_gt_mapping.json`` (a list of ``{"input": "test_gt/<cat>/<cat>_<loc>",
"output": "test/<secret>"}``) maps back to locations (:class:`RgbLayout`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from deo.errors import DataError

CSV_COLUMNS: tuple[str, ...] = ("category", "location_id", "image_id", "timestamp", "polygon")
FIRST_MS_ONLY_IMAGE_ID = 100


def stem(split: str, category: str, location_id: int, image_id: int) -> str:
    """The path stem shared by a Sentinel scene and its RGB partner."""
    name = f"{category}_{location_id}"
    return f"{split}/{category}/{name}/{name}_{image_id}"


def sentinel_relpath(
    split: str, category: str, location_id: int, image_id: int, folder: str | None = None
) -> str:
    """The scene's path in the archive below its prefix; ``folder`` replaces the split's name."""
    return stem(folder or split, category, location_id, image_id) + ".tif"


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


def select_scenes(
    scenes: pd.DataFrame, max_samples: int, seed: int, folders: Mapping[str, str] | None = None
) -> pd.DataFrame:
    """A seeded uniform sample of at most ``max_samples`` scenes, in a stable order.

    Sorting first makes the choice independent of CSV row order; the result keeps that sorted
    order so shard assignment and the store's row order are reproducible. ``folders`` maps a
    split to its folder in the archive where the two differ (fMoW-Sentinel: test -> test_gt).
    """
    folders = folders or {}
    keys = ["split", "category", "location_id", "image_id"]
    ordered = scenes.sort_values(keys, kind="stable").drop_duplicates(keys).reset_index(drop=True)
    if len(ordered) > max_samples:
        ordered = ordered.sample(n=max_samples, random_state=seed).sort_values(keys, kind="stable")
    out = ordered.reset_index(drop=True)
    out["s2_relpath"] = [
        sentinel_relpath(r.split, r.category, r.location_id, r.image_id, folders.get(r.split))
        for r in out.itertuples()
    ]
    out["has_partner"] = out["image_id"] < FIRST_MS_ONLY_IMAGE_ID
    return out


class RgbLayout:
    """Where each scene's fMoW-RGB partner lives: the plain layout, or a split's mapped folders.

    ``mappings`` holds, per split, the parsed ``<split>_gt_mapping.json`` as
    ``{(category, "<category>_<loc>"): "<split>/<secret>"}``; a mapped split's location missing
    from its mapping has no partner (``relpaths`` returns None).
    """

    def __init__(self, mappings: Mapping[str, Mapping[tuple[str, str], str]] | None = None):
        self.mappings = dict(mappings or {})

    @classmethod
    def load(cls, root: Path, files: Mapping[str, str]) -> RgbLayout:
        """Read the mapping file of each split in ``files`` (names below ``root``)."""
        return cls({split: read_test_mapping(root / name) for split, name in files.items()})

    def relpaths(
        self, split: str, category: str, location_id: int, image_id: int
    ) -> tuple[str, str] | None:
        if split not in self.mappings:
            return rgb_relpaths(split, category, location_id, image_id)
        folder = self.mappings[split].get((category, f"{category}_{location_id}"))
        if folder is None:
            return None
        secret = folder.rstrip("/").rsplit("/", 1)[-1]
        base = f"{folder.rstrip('/')}/{secret}_{image_id}_rgb"
        return base + ".jpg", base + ".json"


def read_test_mapping(path: Path) -> dict[tuple[str, str], str]:
    """Parse fMoW's ``test_gt_mapping.json``: ``[{"input": "test_gt/<cat>/<cat>_<loc>",
    "output": "test/<secret>"}, ...]`` into ``{(cat, "<cat>_<loc>"): "test/<secret>"}``."""
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(path, f"unreadable fMoW mapping JSON: {e}") from e
    if not isinstance(entries, list):
        raise DataError(
            path, f"expected a list of {{input, output}} objects, got {type(entries).__name__}"
        )
    out: dict[tuple[str, str], str] = {}
    for i, entry in enumerate(entries):
        ok = isinstance(entry, dict) and all(
            isinstance(entry.get(k), str) for k in ("input", "output")
        )
        parts = entry["input"].strip("/").split("/") if ok else []
        if len(parts) != 3 or len(entry["output"].strip("/").split("/")) != 2:
            raise DataError(
                path,
                f"entry {i} is not {{'input': '<split>_gt/<cat>/<cat>_<loc>', "
                f"'output': '<split>/<id>'}}: {str(entry)[:120]}",
            )
        out[(parts[1], parts[2])] = entry["output"].strip("/")
    return out
