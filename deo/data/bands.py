"""Sentinel-2 band metadata as data: names, central wavelengths and native resolutions.

The fMoW-Sentinel GeoTIFFs hold all 13 bands in wavelength order; the model uses 10 of them.
Wavelengths are Sentinel-2A central wavelengths (ESA, S2 MSI spectral response, v3.0).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Band:
    name: str
    wavelength_nm: float
    resolution_m: int


SENTINEL2_BANDS: tuple[Band, ...] = (
    Band("B01", 442.7, 60),
    Band("B02", 492.4, 10),
    Band("B03", 559.8, 10),
    Band("B04", 664.6, 10),
    Band("B05", 704.1, 20),
    Band("B06", 740.5, 20),
    Band("B07", 782.8, 20),
    Band("B08", 832.8, 10),
    Band("B8A", 864.7, 20),
    Band("B09", 945.1, 60),
    Band("B10", 1373.5, 60),
    Band("B11", 1613.7, 20),
    Band("B12", 2202.4, 20),
)
"""The 13 bands of an fMoW-Sentinel GeoTIFF, in file order."""

BY_NAME: dict[str, Band] = {b.name: b for b in SENTINEL2_BANDS}

MS_BANDS: tuple[str, ...] = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
"""The 10 channels the student's multispectral embedding takes, in this order."""

RGB_BANDS: tuple[str, ...] = ("B04", "B03", "B02")
"""The Sentinel-2 bands a high-resolution R, G, B partner replaces, in R, G, B order."""


def file_index(name: str) -> int:
    """0-based position of a band in an fMoW-Sentinel GeoTIFF."""
    return [b.name for b in SENTINEL2_BANDS].index(name)


def ms_index(name: str) -> int:
    """0-based position of a band among the model's 10 MS channels."""
    return MS_BANDS.index(name)
