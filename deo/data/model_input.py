"""The model's 10-channel input: which channels, how the optical ones are scaled, the statistics.

Contract C2 (the authors' ``DataAugmentationDINOMS``): channels ``[R, G, B, B05, B06, B07, B08,
B8A, B11, B12]``. The three optical channels are the aerial partner where a sample has one and
Sentinel-2's own B04/B03/B02 otherwise; per crop they are divided by their maximum (over the
three channels and every pixel, when it exceeds ``MAX_EPS``) and clipped to [0, 1], which puts an
8-bit aerial image and 10 m reflectances on one scale. Then all ten channels are normalised
together with ``normalisation``: the optical ones with statistics of that max-scaled input, the
seven others with Sentinel-2 DN statistics.

Why two sets of optical statistics: a run without the aerial data (the ablation
``train.ablation.hr_optical: false``) feeds Sentinel-2's RGB everywhere, a different
distribution, so its channels are normalised with statistics of that input (``OPTICAL_S2``).
"""

from __future__ import annotations

from collections.abc import Mapping

from deo.data.bands import MS_BANDS, RGB_BANDS
from deo.errors import DataError

MODEL_BANDS: tuple[str, ...] = (
    "B04",
    "B03",
    "B02",
    "B05",
    "B06",
    "B07",
    "B08",
    "B8A",
    "B11",
    "B12",
)
"""The model's channels in order (ESA spelling); channels 0-2 carry the optical input."""
OPTICAL_CHANNELS: tuple[int, ...] = (0, 1, 2)
MS_ONLY: tuple[int, ...] = tuple(MS_BANDS.index(b) for b in MODEL_BANDS[3:])
"""Positions in the store's ``s2`` of model channels 3-9 (equal to 3..9: B05..B12 keep place)."""
S2_OPTICAL: tuple[int, ...] = tuple(MS_BANDS.index(b) for b in RGB_BANDS)
"""Positions in the store's ``s2`` of B04, B03, B02: the optical input without a partner."""

MAX_EPS = 1e-6
"""A crop whose optical maximum is at most this is left unscaled (the authors' ``EPS``)."""

OPTICAL = ("optical_R", "optical_G", "optical_B")
"""Statistics keys of the max-scaled optical input with the aerial partners (the paper's)."""
OPTICAL_S2 = ("optical_s2_R", "optical_s2_G", "optical_s2_B")
"""Statistics keys of the max-scaled optical input from Sentinel-2's RGB alone."""

AUTHORS_MEAN: tuple[float, ...] = (
    0.4182007312774658,
    0.4214799106121063,
    0.3991275727748871,
    1263.73947144,
    1645.40315151,
    1846.87040806,
    1762.59530783,
    1972.62420416,
    1732.16362238,
    1247.91870117,
)
"""The authors' ``normalize_hr`` (``DEO/utils/augmentations.py``; torchgeo's ``_deo_transforms``):
[0, 1] statistics of their max-scaled optical input, then fMoW-Sentinel DN statistics of the
seven other bands. They apply it to every view, with or without an aerial partner."""
AUTHORS_STD: tuple[float, ...] = (
    0.28774282336235046,
    0.27541765570640564,
    0.2764017581939697,
    948.9819932,
    1108.06650639,
    1258.36394548,
    1233.1492281,
    1364.38688993,
    1310.36996126,
    1087.6020813,
)


def normalisation(
    stats: Mapping[str, Mapping[str, float]],
    partners: bool,
    where: object = "band statistics",
    source: str = "data",
) -> tuple[list[float], list[float]]:
    """Mean and std of the 10 model channels from the stats stage's ``stats``.

    ``partners`` selects the optical statistics of the input a run trains on (aerial partners
    where present, or Sentinel-2's RGB everywhere). ``source="authors"`` returns the authors'
    fixed constants instead (``train.*.crops.normalisation``), whatever the data.
    """
    if source == "authors":
        return list(AUTHORS_MEAN), list(AUTHORS_STD)
    if source != "data":
        raise ValueError(f"normalisation source must be 'data' or 'authors', got {source!r}")
    keys = (OPTICAL if partners else OPTICAL_S2) + MODEL_BANDS[3:]
    if missing := [k for k in keys if k not in stats]:
        raise DataError(
            where,
            f"statistics lack {missing}: rerun the stats stage (it computes the statistics "
            "of the max-scaled optical input too)",
        )
    mean = [float(stats[k]["mean"]) for k in keys]
    std = [float(stats[k]["std"]) for k in keys]
    if bad := [k for k, s in zip(keys, std, strict=True) if not s > 0]:
        raise DataError(where, f"normalisation std of {bad} is not positive")
    return mean, std
