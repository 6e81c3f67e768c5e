"""Join each selected Sentinel scene with its fMoW-RGB partner by path stem.

Scenes whose partner does not exist by design (``image_id >= 100``) or could not be fetched are
kept for MS-only use; a scene whose GeoTIFF is absent is rejected. Every decision is counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from deo.data.fmow import RgbLayout
from deo.data.rejects import Reject


@dataclass
class PairResult:
    pairs: pd.DataFrame
    rejects: list[Reject]
    counts: dict[str, int]


def pair_scenes(
    selection: pd.DataFrame,
    sentinel_root: Path,
    rgb_root: Path | None,
    failures: dict[str, str] | None = None,
    layout: RgbLayout | None = None,
) -> PairResult:
    """Resolve local files for each selected scene; ``rgb_root=None`` means no optical partners.

    ``failures`` maps a local path to why an earlier stage (fetch, extract) could not provide
    it, so an absent file is reported with its real reason rather than as merely absent.
    ``layout`` says where partners live (fMoW-RGB's test split is in mapped folders); a
    location its split's mapping does not list has no partner (``partner_unmapped``).
    """
    failures = failures or {}
    layout = layout or RgbLayout()
    rows, rejects, counts = [], [], Counter()
    for scene in selection.itertuples(index=False):
        s2 = sentinel_root / scene.s2_relpath
        if not s2.is_file():
            reason = failures.get(str(s2), "file listed in the CSV is absent")
            rejects.append(Reject(str(s2), "pair", reason))
            counts["rejected_missing_tif"] += 1
            continue
        jpg = meta = None
        if rgb_root is None:
            status = "ms_only_configured"
        elif not scene.has_partner:
            status = "ms_only_by_design"
        elif (
            rels := layout.relpaths(scene.split, scene.category, scene.location_id, scene.image_id)
        ) is None:
            status = "partner_unmapped"
        else:
            jpg, meta = rgb_root / rels[0], rgb_root / rels[1]
            problems = [(p, _missing_reason(p, failures)) for p in (jpg, meta) if not p.is_file()]
            for path, reason in problems:
                rejects.append(Reject(str(path), "pair", reason))
            if problems:
                jpg = meta = None
                status = "partner_missing"
            else:
                status = "paired"
        counts[status] += 1
        rows.append(
            {
                **scene._asdict(),
                "s2_path": str(s2),
                "rgb_jpg": None if jpg is None else str(jpg),
                "rgb_json": None if meta is None else str(meta),
                "pairing": status,
            }
        )
    pairs = pd.DataFrame(
        rows, columns=[*selection.columns, "s2_path", "rgb_jpg", "rgb_json", "pairing"]
    )
    pairs["order"] = range(len(pairs))
    return PairResult(pairs, rejects, dict(counts))


def _missing_reason(path: Path, failures: dict[str, str]) -> str:
    if str(path) in failures:
        return failures[str(path)]
    return "partner file absent"
