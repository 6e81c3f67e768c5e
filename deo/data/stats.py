"""Per-band mean and standard deviation of the pre-training store, streamed block by block.

Normalisation must come from the data the model trains on, so the stats stage computes these
over the training split and records them in the store's attrs (``stats``) and a JSON file.

Conventions:
- pixels equal to 0 in a band are excluded from that band's statistics: 0 is the nodata and
  padding value of the harmonised tiles, and counting it would drag means down and inflate
  standard deviations by an amount that depends on how much of the scene was padded. The same
  rule applies to the ``rgb`` channels (keys ``R``, ``G``, ``B``), whose padding is 0 too;
- values are in the stored units (Sentinel-2 digital numbers, RGB 0..255);
- the standard deviation is the population one (divide by the count, not count - 1);
- the model's optical channels (``deo.data.model_input``) get statistics of their own, of the
  input as training feeds it: per sample, the aerial partner where ``has_rgb`` (else B04, B03,
  B02) divided by its maximum over the three channels (``optical_*``), and Sentinel-2's RGB so
  scaled for every sample (``optical_s2_*``, for runs without the partners). Training scales
  per crop; the statistics scale per whole tile, which global crops (40-100 % of the tile) are
  close to.

The store is far larger than memory, so moments are accumulated per block in float64 and
combined with Chan et al.'s parallel update of (count, mean, M2), which stays accurate where a
running sum of squares would cancel catastrophically for large, positive DNs.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from deo.data.model_input import MAX_EPS, OPTICAL, OPTICAL_S2, S2_OPTICAL
from deo.data.store import RGB_CHANNELS, ShardReader, open_store, store_bands
from deo.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Moments:
    """Per-channel count, mean and sum of squared deviations (M2) of the valid pixels seen."""

    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, channels: int) -> Moments:
        return cls(np.zeros(channels), np.zeros(channels), np.zeros(channels))

    @classmethod
    def of_block(cls, x: np.ndarray) -> Moments:
        """Moments of a ``(samples, channels, H, W)`` block, ignoring pixels equal to 0.

        Two-pass within the block (mean first, then squared deviations from it), one channel at
        a time so the float64 temporary is a single channel's worth.
        """
        channels = x.shape[1]
        count, mean, m2 = np.zeros(channels), np.zeros(channels), np.zeros(channels)
        for c in range(channels):
            values = x[:, c].ravel()
            count[c] = np.count_nonzero(values)
            if count[c] == 0:
                continue
            mean[c] = values.sum(dtype=np.float64) / count[c]  # zeros add nothing to the sum
            dev = np.subtract(values, mean[c], dtype=np.float64)
            if count[c] < values.size:
                dev[values == 0] = 0.0
            m2[c] = np.dot(dev, dev)
        return cls(count, mean, m2)

    def merge(self, other: Moments) -> Moments:
        """Chan et al.'s pairwise combination: exact for any split of the data into parts."""
        count = self.count + other.count
        safe = np.where(count > 0, count, 1.0)
        delta = other.mean - self.mean
        mean = self.mean + delta * other.count / safe
        m2 = self.m2 + other.m2 + delta**2 * self.count * other.count / safe
        return Moments(count, mean, m2)


def _where(group: zarr.Group) -> str:
    """A name for the store in error messages."""
    return str(group.store)


def _split_rows(group: zarr.Group, table: pd.DataFrame | None, split: str | None) -> np.ndarray:
    """Store rows of the samples in ``split`` (all rows when ``split`` is None), ascending."""
    n = group["s2"].shape[0]
    if split is None:
        return np.arange(n)
    if table is None:
        raise ValueError(f"split={split!r} needs the store's sample table (table=...)")
    if "split" not in table:
        raise DataError(_where(group), "the sample table has no 'split' column")
    if len(table) != n:
        raise DataError(_where(group), f"the sample table has {len(table)} rows for {n} samples")
    return np.flatnonzero(table["split"].to_numpy() == split)


def _partner_flags(group: zarr.Group, table: pd.DataFrame | None) -> np.ndarray:
    """Per store row, whether its optical input is the aerial partner (the table's flag)."""
    n = group["s2"].shape[0]
    if "rgb" not in group.array_keys():
        return np.zeros(n, dtype=bool)
    if table is None or "has_rgb" not in table:
        raise DataError(
            _where(group),
            "the store holds 'rgb' but no sample table with a 'has_rgb' column was given: the "
            "optical statistics need it (table=...; contract C1)",
        )
    if len(table) != n:
        raise DataError(_where(group), f"the sample table has {len(table)} rows for {n} samples")
    return table["has_rgb"].to_numpy(dtype=bool)


def max_scaled(x: np.ndarray) -> np.ndarray:
    """``(samples, 3, H, W)`` divided per sample by its maximum (above ``MAX_EPS``), float64."""
    x = x.astype(np.float64)
    peak = x.max(axis=(1, 2, 3), keepdims=True)
    return np.divide(x, peak, out=x, where=peak > MAX_EPS)


def _optical_moments(
    s2: np.ndarray, rgb: np.ndarray | None, partner: np.ndarray
) -> tuple[Moments, Moments]:
    """Moments of the max-scaled optical input (partners where present; Sentinel-2's only)."""
    own = max_scaled(s2[:, list(S2_OPTICAL)])
    s2_only = Moments.of_block(own)
    if rgb is None or not partner.any():
        return s2_only, s2_only
    mixed = Moments.of_block(own[~partner]).merge(Moments.of_block(max_scaled(rgb[partner])))
    return mixed, s2_only


def band_stats(
    store: Path | zarr.Group,
    table: pd.DataFrame | None = None,
    split: str | None = "train",
    block: int = 64,
    *,
    threads: int = 1,
) -> dict[str, dict[str, float]]:
    """``{band: {"mean", "std", "count"}}`` over the valid pixels of ``split``'s samples.

    Covers the ``s2`` bands (by the store's band names), when the store has ``rgb`` the
    channels ``R``, ``G``, ``B``, and the model's optical input (``OPTICAL``, ``OPTICAL_S2``;
    with ``rgb`` this needs ``table``'s ``has_rgb``). ``block`` samples are read and reduced at
    a time, by ``threads`` threads (decoding and numpy release the GIL); the blocks' moments are
    merged in block order, so the result does not depend on ``threads``.
    """
    group = store if isinstance(store, zarr.Group) else open_store(store)
    rows = _split_rows(group, table, split)
    if len(rows) == 0:
        raise DataError(_where(group), f"no samples in split {split!r} to compute statistics on")
    names = {"s2": store_bands(group)}
    if "rgb" in group.array_keys():
        names["rgb"] = RGB_CHANNELS
    partner = _partner_flags(group, table)
    readers = {name: ShardReader(group[name]) for name in names}
    names |= {"optical": OPTICAL, "optical_s2": OPTICAL_S2}
    moments = {name: Moments.empty(len(bands)) for name, bands in names.items()}

    def reduce(part: np.ndarray) -> dict[str, Moments]:
        arrays = {name: reader.read(part) for name, reader in readers.items()}
        out = {name: Moments.of_block(x) for name, x in arrays.items()}
        out["optical"], out["optical_s2"] = _optical_moments(
            arrays["s2"], arrays.get("rgb"), partner[part]
        )
        return out

    parts = [rows[start : start + block] for start in range(0, len(rows), block)]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for part_moments in pool.map(reduce, parts):
            moments = {name: moments[name].merge(m) for name, m in part_moments.items()}
    stats: dict[str, dict[str, float]] = {}
    for name, bands in names.items():
        m = moments[name]
        for i, band in enumerate(bands):
            if m.count[i] == 0:
                raise DataError(_where(group), f"band {band} has no non-zero pixel in {split!r}")
            std = float(np.sqrt(m.m2[i] / m.count[i]))
            stats[band] = {"mean": float(m.mean[i]), "std": std, "count": int(m.count[i])}
    log.info("band statistics over %d samples of split %r: %s", len(rows), split, stats)
    return stats


def write_stats(store: Path, stats: dict, json_path: Path) -> None:
    """Record ``stats`` in the store's attrs (for readers of the store) and a JSON file (for
    Snakemake and humans)."""
    open_store(store)
    group = zarr.open_group(store, mode="r+", zarr_format=3)
    group.attrs["stats"] = stats
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, json_path)


def read_stats(store: Path | zarr.Group) -> dict:
    """The ``stats`` attr of a store, or a clear error when the stats stage has not run."""
    group = store if isinstance(store, zarr.Group) else open_store(store)
    stats = group.attrs.get("stats")
    if not isinstance(stats, dict):
        raise DataError(
            _where(group), "no 'stats' attribute: the stats stage has not run on this store"
        )
    return stats
