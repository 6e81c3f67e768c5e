"""How a model wants its input: channel order and normalisation (the "input spec", contract C2).

``deo export`` writes one beside the torchgeo-layout weights as JSON; ``RELEASED_DEO`` is the
released model's, from torchgeo 0.10.1 (``torchgeo/models/deo.py``: ``_deo_transforms`` and the
``DEO_Weights.DEO_SWIN`` metadata). The evaluation reads it so every model is normalised as it
was trained instead of with each benchmark's own statistics.

Band names are ESA's spelling (``B04``, ``B8A``); :func:`normalise_band_name` also accepts
torchgeo's (``B4``), so a checkpoint's metadata in either spelling maps to the same channel.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deo.data.model_input import (
    AUTHORS_MEAN,
    AUTHORS_STD,
    MODEL_BANDS,
    OPTICAL_CHANNELS,
    normalisation,
)
from deo.errors import ConfigError, DataError

_BAND = re.compile(r"B0*(\d{1,2})(A?)", re.IGNORECASE)


def normalise_band_name(name: str) -> str:
    """ESA's spelling of a Sentinel-2 band name: ``B4``/``b04`` -> ``B04``, ``B8a`` -> ``B8A``."""
    match = _BAND.fullmatch(name.strip())
    if match is None:
        raise ConfigError(f"{name!r} is not a Sentinel-2 band name (B1 ... B12, B8A)")
    number, suffix = int(match.group(1)), match.group(2).upper()
    if (suffix and number != 8) or not 1 <= number <= 12:
        raise ConfigError(f"{name!r} is not a Sentinel-2 band name (B1 ... B12, B8A)")
    return f"B{number}{suffix}" if suffix else f"B{number:02d}"


def normalise_band_names(names: Sequence[str]) -> tuple[str, ...]:
    """Each name in ESA's spelling; a repeated band is an error (channels would be ambiguous)."""
    out = tuple(normalise_band_name(n) for n in names)
    if len(set(out)) != len(out):
        raise ConfigError(f"band names {list(names)} name a band twice")
    return out


@dataclass(frozen=True)
class InputSpec:
    """Channel order and normalisation of a model's 10-channel input.

    ``optical_channels`` (normally 0, 1, 2) are scaled into [0, 1] first: by the joint maximum
    of those channels in each image (``"max"``, the authors' per-crop rule) or by a fixed
    number (e.g. 255 for uint8 aerial images); then every channel is ``(x - mean) / std``, the
    other channels as Sentinel-2 DN (reflectance x 10000).
    """

    bands: tuple[str, ...]
    optical_channels: tuple[int, ...]
    optical_scale: str | float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    img_size: int
    window_size: int

    def __post_init__(self) -> None:
        n = len(self.bands)
        if tuple(normalise_band_names(self.bands)) != tuple(self.bands):
            raise ConfigError(f"input spec: bands {self.bands} are not in ESA spelling (B04, B8A)")
        if len(self.mean) != n or len(self.std) != n:
            raise ConfigError(
                f"input spec: {n} bands but {len(self.mean)} means and {len(self.std)} stds"
            )
        if not all(s > 0 for s in self.std):
            raise ConfigError(f"input spec: every std must be positive, got {self.std}")
        if not all(0 <= c < n for c in self.optical_channels):
            raise ConfigError(
                f"input spec: optical channels {self.optical_channels} outside 0..{n - 1}"
            )
        scale = self.optical_scale
        if scale != "max" and not (isinstance(scale, int | float) and scale > 0):
            raise ConfigError(f"input spec: optical_scale must be 'max' or > 0, not {scale!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "input spec") -> InputSpec:
        """Parse a spec; bands in either spelling are normalised to ESA's."""
        try:
            raw: dict[str, Any] = json.loads(text)
            scale = raw["optical_scale"]
            return cls(
                bands=normalise_band_names([str(b) for b in raw["bands"]]),
                optical_channels=tuple(int(c) for c in raw["optical_channels"]),
                optical_scale=scale if scale == "max" else float(scale),
                mean=tuple(float(m) for m in raw["mean"]),
                std=tuple(float(s) for s in raw["std"]),
                img_size=int(raw["img_size"]),
                window_size=int(raw["window_size"]),
            )
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as err:
            raise ConfigError(f"{source}: not a readable input spec ({err!r})") from err

    @classmethod
    def read(cls, path: Path) -> InputSpec:
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"{path}: cannot read the input spec: {err}") from err
        return cls.from_json(text, str(path))

    def write(self, path: Path) -> None:
        Path(path).write_text(self.to_json())


def training_input_spec(
    band_stats: Mapping[str, Mapping[str, float]],
    img_size: int,
    window_size: int,
    partners: bool = True,
    source: str = "data",
) -> InputSpec:
    """The spec of a model trained here: exactly the normalisation training used, i.e. the
    optical channels by their max, then the stats stage's statistics of that max-scaled input
    (``partners``: with the aerial partners, else Sentinel-2's RGB) and of the 7 other bands,
    or the authors' constants (``source="authors"``)."""
    try:
        mean, std = normalisation(band_stats, partners, source=source)
    except DataError as err:
        raise ConfigError(str(err)) from err
    return InputSpec(
        bands=MODEL_BANDS,
        optical_channels=OPTICAL_CHANNELS,
        optical_scale="max",
        mean=tuple(mean),
        std=tuple(std),
        img_size=img_size,
        window_size=window_size,
    )


# torchgeo 0.10.1 ``DEO_Weights.DEO_SWIN.meta['bands']``, in its own spelling.
RELEASED_DEO_TORCHGEO_BANDS: tuple[str, ...] = (
    "B4",
    "B3",
    "B2",
    "B5",
    "B6",
    "B7",
    "B8",
    "B8A",
    "B11",
    "B12",
)

RELEASED_DEO = InputSpec(
    bands=normalise_band_names(RELEASED_DEO_TORCHGEO_BANDS),
    optical_channels=OPTICAL_CHANNELS,
    optical_scale="max",
    # torchgeo 0.10.1 ``_deo_transforms``: the authors' ``normalize_hr``
    mean=AUTHORS_MEAN,
    std=AUTHORS_STD,
    img_size=224,  # DEO_SWIN.meta['img_size']
    window_size=12,  # the window torchgeo's DEO sets on every block
)
"""The released DEO's input (torchgeo ``DEO_Weights.DEO_SWIN``)."""
