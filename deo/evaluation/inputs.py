"""Map a benchmark's named bands onto the student's input channels, explicitly.

Every reader hands its raw pixels here with the names of their bands, so the mapping onto the
model's inputs is written once, by band name, and never by position:

- ``ms``: the 10 channels of ``deo.data.bands.MS_BANDS`` (B02 … B12 without B09/B10), each
  normalised as ``(x - mean) / std`` with the benchmark's own statistics (keyed by band name).
  A band the benchmark does not have is filled with 0 *after* normalisation, i.e. with that
  band's mean: the most neutral value the model has seen, never a raw 0 that would read as an
  extreme reflectance. Missing bands are logged once and exposed as ``missing_bands`` so results
  can record them.
- ``rgb``: the 3 channels red, green, blue of an optical (aerial or very-high-resolution)
  image, divided by the sensor's full scale (255 for 8-bit products) and clipped to [0, 1].
  An RGB benchmark without all three is an error: there is no neutral fill for an optical
  image.

Benchmark band names are translated to canonical ones before they get here: Sentinel-2 bands as
``B01`` … ``B12``/``B8A`` (as in ``deo.data.bands``), optical ones as ``red``, ``green``,
``blue``, ``nir``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from deo.data.bands import MS_BANDS
from deo.data.stats import Moments
from deo.errors import DataError

log = logging.getLogger(__name__)

Modality = Literal["ms", "rgb"]

RGB_CHANNELS: tuple[str, ...] = ("red", "green", "blue")
"""The 3 channels of the student's optical embedding, in this order."""

MISSING_FILL = 0.0
"""Value of a missing MS band after normalisation: the band's own mean."""


@dataclass(frozen=True)
class BandStats:
    """Per-band mean and standard deviation, keyed by canonical band name."""

    mean: Mapping[str, float]
    std: Mapping[str, float]

    def to_json(self) -> dict[str, dict[str, float]]:
        return {band: {"mean": self.mean[band], "std": self.std[band]} for band in self.mean}

    @classmethod
    def from_json(cls, entries: Mapping[str, Mapping[str, float]]) -> BandStats:
        return cls(
            {band: float(e["mean"]) for band, e in entries.items()},
            {band: float(e["std"]) for band, e in entries.items()},
        )


def moments_stats(bands: Sequence[str], images: Iterable[np.ndarray]) -> BandStats:
    """Mean and population std per band over ``(C, H, W)`` images whose channels are ``bands``.

    Pixels equal to 0 are left out, as in the pre-training statistics (``deo.data.stats``): 0
    is the nodata value of Sentinel-2 products and of padded scenes.
    """
    total = Moments.empty(len(bands))
    seen = 0
    for image in images:
        total = total.merge(Moments.of_block(np.asarray(image)[None]))
        seen += 1
    if seen == 0:
        raise ValueError("no images to compute band statistics on")
    count = np.where(total.count > 0, total.count, 1.0)
    std = np.sqrt(total.m2 / count)
    return BandStats(
        {b: float(total.mean[i]) for i, b in enumerate(bands)},
        {b: float(std[i]) for i, b in enumerate(bands)},
    )


def cached_stats(path: Path, key: str, compute: Callable[[], BandStats]) -> BandStats:
    """Statistics stored at ``path`` under ``key``, computing and saving them on first use.

    ``key`` names what they were computed on (benchmark, split and a digest of the sample
    list), so a changed split recomputes instead of reusing stale numbers. A cache that cannot
    be written (read-only data folder) only costs a recomputation next time.
    """
    path = Path(path)
    if path.is_file():
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(path, f"unreadable band statistics cache: {exc}") from exc
        if cached.get("key") == key:
            return BandStats.from_json(cached["bands"])
        log.info("%s holds statistics for %r, not %r: recomputing", path, cached.get("key"), key)
    stats = compute()
    text = json.dumps({"key": key, "bands": stats.to_json()}, indent=1, sort_keys=True) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, path)
        log.info("band statistics for %s written to %s", key, path)
    except OSError as exc:
        log.warning("cannot cache band statistics at %s (%s); they will be recomputed", path, exc)
    return stats


class InputMapping:
    """Turns a ``(C, H, W)`` array whose channels are ``bands`` into a model input tensor.

    Built once per dataset from the band names the benchmark provides; the per-sample call
    is then a few array operations.
    """

    def __init__(
        self,
        modality: Modality,
        bands: Sequence[str],
        *,
        stats: BandStats | None = None,
        rgb_scale: float = 255.0,
        source: str = "benchmark",
    ) -> None:
        if modality not in ("ms", "rgb"):
            raise ValueError(f"modality must be 'ms' or 'rgb', not {modality!r}")
        self.modality: Modality = modality
        self.bands = tuple(bands)
        self.channels = MS_BANDS if modality == "ms" else RGB_CHANNELS
        self.missing_bands = tuple(b for b in self.channels if b not in self.bands)
        self._pairs = [(i, self.bands.index(b)) for i, b in enumerate(self.channels) if b in bands]
        if modality == "rgb":
            if self.missing_bands:
                raise DataError(source, f"an RGB input needs {RGB_CHANNELS}; has {self.bands}")
            self._scale = np.full(3, 1.0 / rgb_scale, dtype=np.float32)
            self._offset = np.zeros(3, dtype=np.float32)
            return
        if stats is None:
            raise ValueError("an MS input needs the benchmark's band statistics")
        present = [self.channels[i] for i, _ in self._pairs]
        unknown = [b for b in present if b not in stats.mean or not stats.std.get(b)]
        if unknown:
            raise DataError(source, f"no usable mean/std for bands {unknown} in the statistics")
        self._scale = np.array([1.0 / stats.std[b] for b in present], dtype=np.float32)
        self._offset = np.array([stats.mean[b] for b in present], dtype=np.float32)
        if self.missing_bands:
            log.warning(
                "%s lacks %s: filled with %s after normalisation (the band mean)",
                source,
                ", ".join(self.missing_bands),
                MISSING_FILL,
            )

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """The model input for ``image`` (channels in ``self.bands`` order), float32."""
        if image.shape[0] != len(self.bands):
            raise ValueError(f"expected {len(self.bands)} channels, got {image.shape[0]}")
        out = np.full((len(self.channels), *image.shape[1:]), MISSING_FILL, dtype=np.float32)
        for k, (dst, src) in enumerate(self._pairs):
            out[dst] = (image[src].astype(np.float32) - self._offset[k]) * self._scale[k]
        if self.modality == "rgb":
            np.clip(out, 0.0, 1.0, out=out)
        return torch.from_numpy(out)
