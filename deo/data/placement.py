"""Where an fMoW-RGB image lies on the ground, from its JSON, and how to decode it cheaply.

fMoW-RGB metadata carry no geotransform. What real files hold (fMoW/dataset README and issue
#14: ``box`` is ``[left, top, width, height]`` in pixels; ssl4rs' repackager asserts that every
ground-truth JSON of v1.2.1 starts with an entry of ``ID: -1``; WILDS reads the category from
``bounding_boxes[1]``, others read ``[1:]``, so readers disagree which entry is the object):

- ``bounding_boxes`` is a list of entries, each with a pixel ``box`` and usually a lon/lat
  ``raw_location`` polygon; the object's entry is not always first;
- ``raw_location`` may be absent (the challenge's test JSONs lost GPS fields), or hold the whole
  image's footprint rather than the object's;
- the CSV row's polygon (fMoW-Sentinel) is the object's.

Any box fitted to any polygon's envelope fits exactly (four corners, six unknowns), so a fit's
residual cannot tell a right pairing from a wrong one. What can is the image's own ``gsd``: a
box paired with the right polygon implies a pixel size close to it, whereas an object box
paired with the image footprint (or the whole image with the object's polygon) implies a pixel
size off by the ratio of their widths. :func:`place_image` therefore tries every box (and the
whole image's extent) against every polygon on offer and keeps the pairing whose implied pixel
size agrees best with ``gsd``, rejecting the image when none agrees within the tolerance.
"""

from __future__ import annotations

import math
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine
from PIL import Image
from rasterio.crs import CRS
from rasterio.warp import transform

from deo.errors import DataError

WGS84 = CRS.from_epsg(4326)
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_PIL_LIMIT = threading.Lock()


@dataclass(frozen=True)
class Placement:
    """Full-resolution pixel -> ``crs`` affine and how it was found."""

    transform: Affine
    info: dict[str, Any]


@dataclass(frozen=True)
class _Candidate:
    box: tuple[float, float, float, float]
    box_label: str  # "bounding_boxes[i] (ID x)" or "whole image"
    polygon: str
    polygon_source: str  # "json[i]" or "csv"


def place_image(
    meta: dict[str, Any],
    meta_json: Path,
    crs: CRS,
    polygon_wkt: str | None,
    gsd_tolerance: float,
) -> Placement | None:
    """The pixel -> ``crs`` affine of the best box/polygon pairing, or None without a polygon.

    Raises :class:`DataError` for malformed boxes and when no pairing implies a pixel size
    within ``gsd_tolerance`` (relative) of the JSON's ``gsd``: the metadata then do not say
    where the image is, and a placement would be wrong by a scale and a shift.
    """
    gsd = float(meta["gsd"])
    width, height = float(meta["img_width"]), float(meta["img_height"])
    candidates = _candidates(meta, meta_json, polygon_wkt, (width, height))
    if not candidates:
        return None
    scored = []
    for cand in candidates:
        fitted = _fit(cand, crs, meta_json)
        if fitted is None:
            continue
        affine, rmse = fitted
        px, py = math.hypot(affine.a, affine.d), math.hypot(affine.b, affine.e)
        error = max(abs(math.log(px / gsd)), abs(math.log(py / gsd)))
        scored.append((error, cand, affine, rmse, (px, py)))
    if not scored:
        return None
    error, best, affine, rmse, (px, py) = min(scored, key=lambda s: s[0])
    if error > math.log1p(gsd_tolerance):
        raise DataError(
            meta_json,
            f"no bounding box agrees with gsd {gsd} m: the best pairing ({best.box_label} with "
            f"the {best.polygon_source} polygon) implies {px:.3g} x {py:.3g} m pixels, outside "
            f"the tolerance of {gsd_tolerance:.0%} (data.harmonise.rgb_gsd_tolerance); "
            f"{len(scored)} pairing(s) tried",
        )
    info = {
        "rgb_registration": "gcp-affine",
        "rgb_polygon_source": "csv" if best.polygon_source == "csv" else "json",
        "rgb_box": best.box_label,
        "rgb_box_polygon": best.polygon_source,
        "rgb_gsd_ratio": round(math.sqrt(px * py) / gsd, 4),
        "rgb_gcp_rmse_m": round(rmse, 4),
    }
    return Placement(affine, info)


def _candidates(
    meta: dict[str, Any], meta_json: Path, polygon_wkt: str | None, size: tuple[float, float]
) -> list[_Candidate]:
    """Every (box, polygon) pairing on offer: each entry's box and the whole image's extent,
    against each entry's ``raw_location`` and the CSV polygon."""
    boxes: list[tuple[tuple[float, float, float, float], str]] = []
    polygons: list[tuple[str, str]] = []
    for i, entry in enumerate(meta["bounding_boxes"]):
        if not isinstance(entry, dict) or "box" not in entry:
            raise DataError(meta_json, f"missing key 'box' in bounding_boxes[{i}]")
        try:
            x, y, w, h = (float(v) for v in entry["box"])
        except (TypeError, ValueError) as e:
            raise DataError(meta_json, f"bounding_boxes[{i}].box must be [x, y, w, h]: {e}") from e
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            raise DataError(
                meta_json, f"bounding_boxes[{i}].box has non-finite values {entry['box']}"
            )
        if w >= 1 and h >= 1:
            boxes.append(((x, y, w, h), f"bounding_boxes[{i}] (ID {entry.get('ID')})"))
        if entry.get("raw_location"):
            polygons.append((entry["raw_location"], f"json[{i}]"))
    if polygon_wkt:
        polygons.append((polygon_wkt, "csv"))
    if not boxes or not polygons:
        return []
    boxes.append(((0.0, 0.0, size[0], size[1]), "whole image"))
    return [_Candidate(box, label, wkt, source) for box, label in boxes for wkt, source in polygons]


def _fit(cand: _Candidate, crs: CRS, meta_json: Path) -> tuple[Affine, float] | None:
    """Least-squares pixel -> ``crs`` affine from the box corners and the polygon envelope."""
    lon, lat = polygon_lonlat(cand.polygon, meta_json)
    west, east, south, north = lon.min(), lon.max(), lat.min(), lat.max()
    if east <= west or north <= south:
        return None
    x, y, w, h = cand.box
    pixel = np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]])
    gx, gy = transform(WGS84, crs, [west, east, east, west], [north, north, south, south])
    design = np.column_stack([pixel, np.ones(4)])
    ground = np.column_stack([gx, gy])
    coef, *_ = np.linalg.lstsq(design, ground, rcond=None)
    rmse = float(np.sqrt(np.mean((design @ coef - ground) ** 2)))
    return Affine(coef[0, 0], coef[1, 0], coef[2, 0], coef[0, 1], coef[1, 1], coef[2, 1]), rmse


def polygon_lonlat(wkt: str, where: Path) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (lon, lat) of a WKT polygon's outer ring."""
    if not isinstance(wkt, str):
        raise DataError(where, f"object polygon must be WKT text, got {type(wkt).__name__}")
    match = re.match(r"\s*POLYGON\s*\(\s*\(([^()]*)\)", wkt, flags=re.IGNORECASE)
    if match is None:
        raise DataError(where, f"object polygon is not a WKT POLYGON: {wkt[:80]!r}")
    try:
        pairs = [[float(v) for v in re.findall(_NUMBER, p)] for p in match.group(1).split(",")]
        ring = np.array(pairs, dtype=np.float64)
    except ValueError as e:
        raise DataError(where, f"malformed WKT polygon {wkt[:80]!r}: {e}") from e
    if ring.ndim != 2 or ring.shape[1] != 2 or len(ring) < 3:
        raise DataError(where, f"malformed WKT polygon {wkt[:80]!r}")
    return ring[:, 0], ring[:, 1]


# --- JPEG decoding ---------------------------------------------------------------------------


@dataclass(frozen=True)
class JpegPixels:
    data: np.ndarray  # uint8 (3, h, w), possibly decoded at reduced scale
    full_size: tuple[int, int]  # (width, height) of the full-resolution image
    scale: int  # full-resolution pixels per decoded pixel along each axis


def jpeg_size(jpg: Path, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the header only, refusing images over ``max_pixels``."""
    with _OpenedJpeg(jpg, max_pixels) as im:
        return im.size


def read_jpeg(jpg: Path, decode_scale: int, max_pixels: int) -> JpegPixels:
    """Decode the JPEG fully (truncation shows only on decoding) as uint8 ``(3, h, w)``.

    ``max_pixels`` replaces PIL's decompression-bomb limit (fMoW-RGB images reach about
    16,000 x 16,000 px, past PIL's default). A ``decode_scale`` of 2, 4 or 8 decodes through
    libjpeg's DCT scaling (PIL ``draft``), which never holds the full image in memory; it gives
    ceil(W / s) pixels of exactly ``s`` source pixels each, so the geometry scales by ``s``.
    """
    try:
        with _OpenedJpeg(jpg, max_pixels) as im:
            im.verify()
        with _OpenedJpeg(jpg, max_pixels) as im:
            full_size = im.size
            scale = 1
            if decode_scale > 1:
                drafted = im.draft(
                    "RGB", (full_size[0] // decode_scale, full_size[1] // decode_scale)
                )
                if drafted is not None:
                    scale = round(full_size[0] / drafted[1][2])
            data = np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(jpg, f"corrupt or truncated JPEG: {e}") from e
    return JpegPixels(np.ascontiguousarray(data.transpose(2, 0, 1)), full_size, scale)


class _OpenedJpeg:
    """``Image.open`` with our pixel cap instead of PIL's global decompression-bomb limit.

    PIL reads its limit from a module global at open time; the lock keeps a concurrent open in
    another thread from seeing it lifted.
    """

    def __init__(self, jpg: Path, max_pixels: int) -> None:
        self.jpg, self.max_pixels = jpg, max_pixels

    def __enter__(self) -> Image.Image:
        if not self.jpg.is_file():
            raise DataError(self.jpg, "file not found")
        with _PIL_LIMIT, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                self.im = Image.open(self.jpg)
            except (OSError, SyntaxError, ValueError) as e:
                raise DataError(self.jpg, f"corrupt or truncated JPEG: {e}") from e
            finally:
                Image.MAX_IMAGE_PIXELS = saved
        width, height = self.im.size
        if width * height > self.max_pixels:
            self.im.close()
            raise DataError(
                self.jpg,
                f"image of {width} x {height} = {width * height} px exceeds "
                f"data.harmonise.rgb_max_pixels = {self.max_pixels}",
            )
        return self.im

    def __exit__(self, *exc: object) -> None:
        self.im.close()
