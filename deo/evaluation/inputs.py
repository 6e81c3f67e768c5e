"""Map a benchmark's named bands onto the evaluated model's input channels, explicitly.

Every reader hands its raw pixels here with the names of their bands and the value scale of
its product, so the mapping onto the model's inputs is written once, by band name, and never
by position. What the model expects comes from its input spec (``deo.models.input_spec``,
contract C2), set per job through ``ModelInput``:

- the model's 10 channels, in the spec's band order (for a model without one, contract C2's
  ``MODEL_BANDS``: R, G, B as B04, B03, B02, then B05 … B12);
- ``normalisation: model`` (default): as the model was trained. The optical channels
  (R, G, B) are scaled into [0, 1] (by their joint per-image maximum for ``optical_scale:
  max``, else by the spec's number for Sentinel-2 DN, by the product's own scale for an optical
  benchmark), then every channel is ``(x - mean) / std`` with the spec's statistics.
- ``normalisation: benchmark``: each MS band z-scored with the benchmark's own statistics
  (keyed by band name), optical images left in [0, 1]: the comparison of earlier runs.

A band the benchmark does not have is filled with 0 *after* normalisation, i.e. with that
band's mean: the most neutral value the model has seen, never a raw 0 that would read as an
extreme reflectance. Missing bands are logged once and exposed as ``missing_bands``.

An optical (RGB) benchmark goes through the RGB embedding when the model has one; a model
without an optical path takes it through its MS embedding, the image in the optical channels
and every other channel at its normalised mean (0), as the authors' model sees RGB as the
first channels of its MS input. An RGB benchmark without all three channels is an error: there
is no neutral fill for an optical image. Optical values are divided by the product's scale
(``value_scale``: from the declared statistics and dtype, never a constant) into [0, 1].

Benchmark band names are translated to canonical ones before they get here: Sentinel-2 bands as
``B01`` … ``B12``/``B8A`` (as in ``deo.data.bands``), optical ones as ``red``, ``green``,
``blue``, ``nir``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from deo.data.stats import Moments
from deo.errors import ConfigError, DataError
from deo.models.input_spec import MODEL_BANDS, OPTICAL_CHANNELS, InputSpec

log = logging.getLogger(__name__)

Modality = Literal["ms", "rgb"]
Normalisation = Literal["model", "benchmark"]

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


_S2_SHORT = re.compile(r"B0?([1-9])")
_CONSTANT_STD = 1e-4
"""A model channel whose values vary less than this over the checked samples is flagged."""
_FAR_MEAN = 10.0
"""A normalised channel whose mean is further than this many stds from 0 is flagged."""


def canonical_s2(name: str) -> str:
    """ESA's spelling of a Sentinel-2 band: torchgeo's ``B4`` and ESA's ``B04`` both give B04."""
    match = _S2_SHORT.fullmatch(name.strip().upper())
    return f"B0{match[1]}" if match else name.strip().upper()


def value_scale(dtype: np.dtype | str, declared_max: float | None = None) -> float:
    """The full scale of an optical product: what its values are divided by to reach [0, 1].

    Read from the product, never assumed: a float product whose declared maximum is at most 1
    is already in [0, 1]; an 8-bit product (by dtype, or by a declared maximum up to 255 in a
    wider type) spans 0–255; otherwise the integer type's range, or for floats the nominal
    range that holds the declared maximum (12-bit 4095, 16-bit 65535).
    """
    dtype = np.dtype(dtype)
    if declared_max is not None and not math.isfinite(declared_max):
        declared_max = None
    if np.issubdtype(dtype, np.floating):
        if declared_max is None:
            raise ValueError("a float optical product needs its declared maximum to find its scale")
        for full in (1.0, 255.0, 4095.0, 65535.0):
            if declared_max <= full * 1.0001:
                return full
        return float(declared_max)
    if not np.issubdtype(dtype, np.integer):
        raise ValueError(f"optical values of dtype {dtype} have no value scale")
    if dtype.itemsize == 1 or (declared_max is not None and declared_max <= 255):
        return 255.0
    if declared_max is not None and declared_max <= 4095:
        return 4095.0
    return float(np.iinfo(dtype).max)


@dataclass(frozen=True)
class ModelInput:
    """What the evaluated model expects, set per job from its encoder (see the module doc)."""

    spec: InputSpec | None = None
    normalisation: Normalisation = "model"
    optical_path: bool = True

    def __post_init__(self) -> None:
        if self.normalisation not in ("model", "benchmark"):
            raise ConfigError(
                f"evaluate.normalisation must be 'model' or 'benchmark', not {self.normalisation!r}"
            )

    @property
    def channels(self) -> tuple[str, ...]:
        """The model's MS channels, in its order (canonical names)."""
        if self.spec is None:
            return MODEL_BANDS
        return tuple(canonical_s2(b) for b in self.spec.bands)

    @property
    def uses_spec(self) -> bool:
        return self.normalisation == "model" and self.spec is not None

    @property
    def optical_channels(self) -> tuple[int, ...]:
        """Positions of R, G, B among ``channels``."""
        if self.spec is not None:
            return self.spec.optical_channels
        return OPTICAL_CHANNELS


class InputMapping:
    """Turns a ``(C, H, W)`` array whose channels are ``bands`` into a model input tensor.

    Built once per dataset from what the benchmark provides (``modality``, ``bands``, its
    statistics and value scale) and what the model expects (``model``); the per-sample call is
    then a few array operations. ``embedding`` is the model path the input is for.
    """

    def __init__(
        self,
        modality: Modality,
        bands: Sequence[str],
        *,
        stats: BandStats | None = None,
        rgb_scale: float | None = None,
        source: str = "benchmark",
        model: ModelInput | None = None,
    ) -> None:
        if modality not in ("ms", "rgb"):
            raise ValueError(f"modality must be 'ms' or 'rgb', not {modality!r}")
        self.modality: Modality = modality
        self.bands = tuple(bands)
        self.stats = stats
        self.rgb_scale = rgb_scale
        self.source = source
        self.model = model or ModelInput()
        self.embedding: Modality = "rgb" if modality == "rgb" and self.model.optical_path else "ms"
        self.channels = RGB_CHANNELS if self.embedding == "rgb" else self.model.channels
        self.raw_max = -math.inf
        """Largest raw optical value seen, for the degenerate-input check."""
        if modality == "rgb":
            self._init_rgb()
        else:
            self._init_ms()

    def for_model(self, model: ModelInput) -> InputMapping:
        """The same benchmark mapped for another model."""
        return InputMapping(
            self.modality,
            self.bands,
            stats=self.stats,
            rgb_scale=self.rgb_scale,
            source=self.source,
            model=model,
        )

    def _init_rgb(self) -> None:
        absent = [b for b in RGB_CHANNELS if b not in self.bands]
        if absent:
            raise DataError(self.source, f"an RGB input needs {RGB_CHANNELS}; has {self.bands}")
        self._src = [self.bands.index(b) for b in RGB_CHANNELS]
        self.missing_bands: tuple[str, ...] = ()
        spec = self.model.spec
        if self.model.uses_spec and spec is not None:
            opt = spec.optical_channels
            self._rgb_mean = np.array([spec.mean[c] for c in opt], dtype=np.float32)
            self._rgb_std = np.array([spec.std[c] for c in opt], dtype=np.float32)

    def _init_ms(self) -> None:
        channels = self.channels
        canonical = [canonical_s2(b) for b in self.bands]
        self.missing_bands = tuple(b for b in channels if b not in canonical)
        self._pairs = [(i, canonical.index(b)) for i, b in enumerate(channels) if b in canonical]
        spec = self.model.spec
        if self.model.uses_spec and spec is not None:
            self._offset = np.array([spec.mean[i] for i, _ in self._pairs], dtype=np.float32)
            self._scale = np.array([1.0 / spec.std[i] for i, _ in self._pairs], dtype=np.float32)
            self._optical = [
                k for k, (i, _) in enumerate(self._pairs) if i in spec.optical_channels
            ]
        else:
            if self.stats is None:
                raise ValueError("an MS input needs the benchmark's band statistics")
            present = [channels[i] for i, _ in self._pairs]
            unknown = [b for b in present if b not in self.stats.mean or not self.stats.std.get(b)]
            if unknown:
                raise DataError(
                    self.source, f"no usable mean/std for bands {unknown} in the statistics"
                )
            self._offset = np.array([self.stats.mean[b] for b in present], dtype=np.float32)
            self._scale = np.array([1.0 / self.stats.std[b] for b in present], dtype=np.float32)
            self._optical = []
        if self.missing_bands:
            log.warning(
                "%s lacks %s: filled with %s after normalisation (the band mean)",
                self.source,
                ", ".join(self.missing_bands),
                MISSING_FILL,
            )

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """The model input for ``image`` (channels in ``self.bands`` order), float32."""
        if image.shape[0] != len(self.bands):
            raise ValueError(f"expected {len(self.bands)} channels, got {image.shape[0]}")
        if self.modality == "rgb":
            return torch.from_numpy(self._rgb(image))
        out = np.full((len(self.channels), *image.shape[1:]), MISSING_FILL, dtype=np.float32)
        values = [image[src].astype(np.float32) for _, src in self._pairs]
        if self._optical:
            values = self._scale_optical(values)
        for k, (dst, _) in enumerate(self._pairs):
            out[dst] = (values[k] - self._offset[k]) * self._scale[k]
        return torch.from_numpy(out)

    def _scale_optical(self, values: list[np.ndarray]) -> list[np.ndarray]:
        """Sentinel-2 R, G, B (DN) into [0, 1], as the spec says, before normalisation."""
        spec = self.model.spec
        assert spec is not None
        optical = [values[k] for k in self._optical]
        if spec.optical_scale == "max":
            top = max(float(v.max()) for v in optical)
            divisor = top if top > 1e-6 else 1.0
        else:
            divisor = float(spec.optical_scale)
        for k in self._optical:
            values[k] = np.clip(values[k] / divisor, 0.0, 1.0)
        return values

    def _rgb(self, image: np.ndarray) -> np.ndarray:
        scale = self.rgb_scale or value_scale(image.dtype)
        rgb = np.stack([image[i].astype(np.float32) for i in self._src])
        if rgb.size:
            self.raw_max = max(self.raw_max, float(rgb.max()))
        rgb = np.clip(rgb / scale, 0.0, 1.0)
        if not self.model.uses_spec:
            normalised = rgb
        else:
            spec = self.model.spec
            assert spec is not None
            if spec.optical_scale == "max" and rgb.size and rgb.max() > 1e-6:
                rgb = rgb / rgb.max()
            normalised = (rgb - self._rgb_mean[:, None, None]) / self._rgb_std[:, None, None]
        if self.embedding == "rgb":
            return np.ascontiguousarray(normalised, dtype=np.float32)
        out = np.full((len(self.channels), *image.shape[1:]), MISSING_FILL, dtype=np.float32)
        for k, channel in enumerate(self.model.optical_channels):
            out[channel] = normalised[k]
        return out


def input_warnings(
    benchmark: str, mapping: InputMapping, images: Iterable[torch.Tensor]
) -> list[str]:
    """Why the model inputs ``images`` (made by ``mapping``) look degenerate; [] when they don't.

    Flags a model channel that the benchmark provides but that is nearly constant over the
    samples or, once normalised, averages more than ``_FAR_MEAN`` stds from 0 (reflectance in
    [0, 1] normalised with DN statistics), and optical values whose range is far from the
    product's declared scale (above it, or reaching less than a twentieth of it: a float
    product read as 8-bit turns black).
    """
    stacked = [img.reshape(-1, *img.shape[-3:]) for img in images]
    if not stacked:
        return []
    pixels = torch.cat([s.transpose(0, 1).reshape(s.shape[1], -1) for s in stacked], dim=1)
    provided = set(range(len(mapping.channels)))
    if mapping.modality == "ms":
        provided -= {mapping.channels.index(b) for b in mapping.missing_bands}
    elif mapping.embedding == "ms":
        provided = set(mapping.model.optical_channels)
    problems = []
    std = pixels.double().std(dim=1)
    mean = pixels.double().mean(dim=1)
    normalised = mapping.modality == "ms" or mapping.model.uses_spec
    for channel in sorted(provided):
        name = f"{benchmark}: channel {channel} ({mapping.channels[channel]})"
        if float(std[channel]) < _CONSTANT_STD:
            problems.append(
                f"{name} is nearly constant (std {float(std[channel]):.2e}) over the checked "
                "samples"
            )
        if normalised and abs(float(mean[channel])) > _FAR_MEAN:
            problems.append(
                f"{name} averages {float(mean[channel]):.1f} after normalisation: its values are "
                "far from the range the statistics declare (a value-scale mismatch?)"
            )
    if mapping.modality == "rgb" and mapping.rgb_scale and math.isfinite(mapping.raw_max):
        scale, top = mapping.rgb_scale, mapping.raw_max
        if top > scale * 1.05 or top < scale / 20:
            effect = "clipped" if top > scale else "nearly black"
            problems.append(
                f"{benchmark}: optical values reach {top:g} but the product declares a scale of "
                f"{scale:g}: the images reach the model {effect}"
            )
    return problems
