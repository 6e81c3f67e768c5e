"""How a model wants its input normalised: the "input spec" of contract C2.

Written by ``deo export`` beside the torchgeo-layout weights as JSON, and provided here for the
released torchgeo DEO (``RELEASED_DEO``), so the evaluation normalises every model as it was
trained instead of with each benchmark's own statistics.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class InputSpec:
    """Channel order and normalisation of a model's 10-channel input.

    ``optical_channels`` (normally 0, 1, 2) are scaled into [0, 1] first: by the joint
    maximum of those channels in each image (``"max"``, the authors' per-crop rule) or by a
    fixed number (e.g. 255 for uint8 aerial images); then every channel is ``(x - mean) / std``.
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
        if len(self.mean) != n or len(self.std) != n:
            raise ValueError(
                f"input spec: {n} bands but {len(self.mean)} means, {len(self.std)} stds"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"input spec: std must be positive, got {self.std}")
        if any(not 0 <= c < n for c in self.optical_channels):
            raise ValueError(
                f"input spec: optical channels {self.optical_channels} outside 0..{n - 1}"
            )
        if self.optical_scale != "max" and not (
            isinstance(self.optical_scale, int | float) and self.optical_scale > 0
        ):
            raise ValueError(
                f"input spec: optical_scale must be 'max' or > 0, not {self.optical_scale!r}"
            )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> InputSpec:
        raw: dict[str, Any] = json.loads(text)
        scale = raw["optical_scale"]
        return cls(
            bands=tuple(str(b) for b in raw["bands"]),
            optical_channels=tuple(int(c) for c in raw["optical_channels"]),
            optical_scale=scale if scale == "max" else float(scale),
            mean=tuple(float(m) for m in raw["mean"]),
            std=tuple(float(s) for s in raw["std"]),
            img_size=int(raw["img_size"]),
            window_size=int(raw["window_size"]),
        )


RELEASED_DEO = InputSpec(
    bands=("B04", "B03", "B02", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"),
    optical_channels=(0, 1, 2),
    optical_scale="max",
    # torchgeo 0.10.1 ``models/deo.py`` ``_deo_transforms``: 0-1 RGB statistics, then the
    # fMoW-Sentinel DN statistics of the seven MS bands.
    mean=(
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
    ),
    std=(
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
    ),
    img_size=224,
    window_size=12,
)
"""The released DEO's input (torchgeo ``DEO_Weights.DEO_SWIN``)."""
