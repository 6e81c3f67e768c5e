"""Per-scene harmonisation: one Sentinel-2 scene and its fMoW-RGB partner onto one footprint.

Sentinel-2 (:func:`read_s2`)
    fMoW-Sentinel GeoTIFFs are Google Earth Engine exports in EPSG:4326 whose pixel size in
    metres depends on latitude, and their shapes vary (most are small crops around the
    object, from a few to several hundred pixels a side). Every scene goes to a north-up grid
    in a metric CRS: a geographic (or non-metric) source is reprojected into the plain 6°
    WGS84 UTM zone of its centre (EPSG 326zz north, 327zz south; no Norway/Svalbard
    exceptions, so the zone is a simple function of the centre), a metric source is resampled
    in its own CRS. ``tiling`` says which grid:

    ``resize`` (the authors', and SatMAE's: each image stored whole and resized)
        The tile covers the scene's whole footprint (its bounds; for a geographic source the
        UTM positions of its edge midpoints) with ``tile_size`` × ``tile_size`` pixels, so
        the pixel size follows the scene (``gsd_m_eff``, not square for a non-square scene)
        and no scene is lost to its size. Slivers left by the small rotation of a geographic
        source in UTM are nodata.
    ``fixed_gsd``
        A ``tile_size`` grid of ``gsd_m`` metres centred on the scene centre, its origin
        snapped to the source pixel lattice (metric source) or to whole multiples of
        ``gsd_m`` (UTM), so that a 10 m source is copied without interpolation. A small scene
        is padded with nodata and rejected when the padding passes ``max_nodata_fraction``.

    Each band group of one native resolution (10/20/60 m) is warped with its own configured
    resampling in one ``reproject`` call. Nodata (padding included) counts towards the
    nodata fraction that rejects a scene.

fMoW-RGB (:func:`read_rgb`)
    The partner's metadata do not include a geotransform. Two ways to place it, in order:

    1. ``gcp-affine``: a bounding box is the pixel envelope of a lon/lat polygon
       (``raw_location`` in the JSON, or the CSV's object polygon). The four box corners and
       the four corners of the polygon's envelope are ground control points for a
       least-squares pixel → grid affine; of all box/polygon pairings the one whose pixel size
       agrees with the JSON ``gsd`` is used, and none agreeing rejects the partner
       (:func:`deo.data.placement.place_image`).
    2. ``gsd-centred``: when there is no polygon or the box is degenerate, the image is placed
       north-up with the JSON ``gsd`` as its pixel size, centred on the grid centre.

    The placement is only a claim: :mod:`deo.data.coreg` checks it against Sentinel-2's own
    pixels. The three bands are warped with ``rgb_resampling`` onto the SAME footprint as the
    Sentinel tile at ``rgb_tile_size`` pixels a side (the aerial detail kept, not averaged to
    10 m). Tile pixels outside the RGB footprint stay 0. Large JPEGs are decoded at a reduced
    DCT scale (PIL ``draft``) when the reduced pixels are still at most half a tile pixel,
    which keeps decoding cheap without changing what averaging to the tile produces.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.errors
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.warp import reproject, transform

from deo.config import HarmoniseConfig
from deo.data.bands import BY_NAME, MS_BANDS, SENTINEL2_BANDS, file_index
from deo.data.placement import place_image, read_jpeg
from deo.errors import ConfigError, DataError

log = logging.getLogger(__name__)

WGS84 = CRS.from_epsg(4326)
RGB_REQUIRED_KEYS: tuple[str, ...] = ("gsd", "img_width", "img_height", "bounding_boxes")


@dataclass(frozen=True)
class TargetGrid:
    """The metric grid a scene's tile lies on: square, north-up, ``size`` pixels a side."""

    crs: CRS
    transform: Affine
    size: int

    @property
    def centre(self) -> tuple[float, float]:
        return self.transform @ (self.size / 2, self.size / 2)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """The footprint (left, bottom, right, top) in ``crs`` units."""
        left, top = self.transform @ (0, 0)
        right, bottom = self.transform @ (self.size, self.size)
        return left, bottom, right, top

    @property
    def gsd_m_eff(self) -> float:
        """Ground sampling distance in metres: the geometric mean of the pixel's two sides."""
        return math.sqrt(abs(self.transform.a * self.transform.e))

    def footprint(self) -> dict[str, Any]:
        """The store table's footprint columns: CRS, bounds and effective GSD."""
        left, bottom, right, top = self.bounds
        return {
            "footprint_crs": self.crs.to_string(),
            "footprint_left": left,
            "footprint_bottom": bottom,
            "footprint_right": right,
            "footprint_top": top,
            "gsd_m_eff": self.gsd_m_eff,
        }

    def resized(self, size: int) -> TargetGrid:
        """The same footprint on ``size`` × ``size`` pixels."""
        left, bottom, right, top = self.bounds
        step_x, step_y = (right - left) / size, (top - bottom) / size
        return TargetGrid(self.crs, Affine(step_x, 0, left, 0, -step_y, top), size)


def utm_epsg(lon: float, lat: float) -> int:
    """EPSG code of the plain 6° WGS84 UTM zone containing (lon, lat)."""
    zone = int((lon + 180.0) // 6.0) % 60 + 1
    return (32600 if lat >= 0 else 32700) + zone


# --- Sentinel-2 ---------------------------------------------------------------------------


def read_s2(path: Path, cfg: HarmoniseConfig) -> tuple[np.ndarray, TargetGrid, dict[str, Any]]:
    """Read one fMoW-Sentinel GeoTIFF as uint16 ``(10, T, T)`` in ``MS_BANDS`` order on its grid.

    Raises :class:`DataError` naming ``path`` for an unreadable, truncated or malformed file
    and for a scene whose nodata share (padding included) exceeds ``max_nodata_fraction``.
    """
    bands, src_crs, src_transform = _read_ms_bands(path)
    grid, epsg = _target_grid(path, src_crs, src_transform, bands.shape[1:], cfg)
    out = np.full((len(MS_BANDS), grid.size, grid.size), cfg.nodata, dtype=np.uint16)
    for method, positions in _resampling_groups(cfg).items():
        group = np.full((len(positions), grid.size, grid.size), cfg.nodata, dtype=np.uint16)
        reproject(
            bands[positions],
            group,
            src_transform=src_transform,
            src_crs=src_crs,
            src_nodata=cfg.nodata,
            dst_transform=grid.transform,
            dst_crs=grid.crs,
            dst_nodata=cfg.nodata,
            resampling=method,
        )
        out[positions] = group
    nodata_fraction = float(np.all(out == cfg.nodata, axis=0).mean())
    if nodata_fraction > cfg.max_nodata_fraction:
        raise DataError(
            path,
            f"all-nodata or mostly nodata scene: {100 * nodata_fraction:.0f}% of pixels are nodata",
        )
    info = {
        "src_crs": src_crs.to_string(),
        "src_res_m": _pixel_size_m(src_crs, src_transform, bands.shape[1:], grid.crs),
        "src_shape": list(bands.shape[1:]),
        "utm_epsg": epsg,
        "grid_crs": grid.crs.to_string(),
        "grid_transform": list(grid.transform)[:6],
        "tiling": cfg.tiling,
        "gsd_m_eff": round(grid.gsd_m_eff, 4),
        "nodata_fraction": round(nodata_fraction, 6),
    }
    return out, grid, info


def _read_ms_bands(path: Path) -> tuple[np.ndarray, CRS, Affine]:
    """The 10 model bands as uint16 ``(10, H, W)``, after checking band count, dtype and CRS.

    Other integer types are clipped into uint16's range (negative DNs become 0).
    """
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        with rasterio.open(path) as src:
            if src.count != len(SENTINEL2_BANDS):
                raise DataError(path, f"expected 13 bands (B01..B12), found {src.count}")
            dtypes = sorted(set(src.dtypes))
            if not all(np.dtype(d).kind in "uif" for d in dtypes):
                raise DataError(
                    path,
                    f"expected uint16 or float32 reflectance DN, found dtype {', '.join(dtypes)}",
                )
            if src.crs is None:
                raise DataError(path, "GeoTIFF has no CRS")
            data = src.read([file_index(b) + 1 for b in MS_BANDS])
            crs, affine = src.crs, src.transform
    except rasterio.errors.RasterioError as e:
        cause = f" ({e.__cause__})" if e.__cause__ else ""
        raise DataError(path, f"truncated or corrupt GeoTIFF: {e}{cause}") from e
    return as_dn(data, path), crs, affine


FLOAT_REFLECTANCE_MAX = 2.0
"""A float tile whose values all stay below this holds reflectance, not DN (reflectance × 1e4)."""


def as_dn(data: np.ndarray, path: Path) -> np.ndarray:
    """uint16 DNs from an integer or float tile; refuses float tiles on the reflectance scale.

    The tiles' dtype is documented nowhere public (every public reader casts to float). Float
    DNs are rounded, non-finite values become 0 (nodata), other integer types are clipped.
    """
    if data.dtype == np.uint16:
        return data
    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        top = float(data[finite].max()) if finite.any() else 0.0
        if 0 < top <= FLOAT_REFLECTANCE_MAX:
            raise DataError(
                path,
                f"float tile on the reflectance scale: values within "
                f"[{float(data[finite].min()):.3g}, {top:.3g}] look like reflectance in [0, 1], "
                f"expected DN (reflectance x 10000); found dtype {data.dtype.name}",
            )
        data = np.where(finite, np.rint(data), 0)
    return np.clip(data, 0, np.iinfo(np.uint16).max).astype(np.uint16)


def _target_grid(
    path: Path, src_crs: CRS, src_transform: Affine, shape: tuple[int, int], cfg: HarmoniseConfig
) -> tuple[TargetGrid, int | None]:
    """The scene's grid (see ``tiling`` above), and the UTM EPSG code when it is reprojected."""
    height, width = shape
    metric = src_crs.is_projected and src_crs.linear_units in ("metre", "meter")
    crs, epsg = src_crs, None
    if not metric:
        cx, cy = src_transform @ (width / 2, height / 2)
        try:
            (lon,), (lat,) = transform(src_crs, WGS84, [cx], [cy])
        except rasterio.errors.RasterioError as e:
            raise DataError(path, f"cannot locate the scene centre in lon/lat: {e}") from e
        epsg = utm_epsg(lon, lat)
        crs = CRS.from_epsg(epsg)
    if cfg.tiling == "resize":
        return _whole_scene_grid(src_crs, src_transform, shape, crs, cfg.tile_size), epsg
    return _fixed_gsd_grid(src_crs, src_transform, shape, crs, metric, cfg), epsg


def _whole_scene_grid(
    src_crs: CRS, src_transform: Affine, shape: tuple[int, int], crs: CRS, size: int
) -> TargetGrid:
    """``size`` pixels a side over the scene's footprint in ``crs``.

    The footprint's sides are where the source's edge midpoints land in ``crs``: exact for a
    metric source, and for a geographic one the rectangle that a scene rotated by the UTM
    grid convergence (a degree or two) fills to within slivers at its corners.
    """
    height, width = shape
    cols = [0, width, width / 2, width / 2]
    rows = [height / 2, height / 2, 0, height]
    xs, ys = zip(*(src_transform @ (c, r) for c, r in zip(cols, rows, strict=True)), strict=True)
    if crs != src_crs:
        xs, ys = transform(src_crs, crs, list(xs), list(ys))
    left, right = sorted(xs[:2])
    bottom, top = sorted(ys[2:])
    return TargetGrid(
        crs, Affine((right - left) / size, 0, left, 0, -(top - bottom) / size, top), size
    )


def _fixed_gsd_grid(
    src_crs: CRS,
    src_transform: Affine,
    shape: tuple[int, int],
    crs: CRS,
    metric: bool,
    cfg: HarmoniseConfig,
) -> TargetGrid:
    """``tile_size`` pixels of ``gsd_m`` centred on the scene centre, origin snapped so that a
    source already at ``gsd_m`` lands pixel-for-pixel on the grid."""
    height, width = shape
    cx, cy = src_transform @ (width / 2, height / 2)
    half = cfg.tile_size * cfg.gsd_m / 2
    g = cfg.gsd_m
    if metric:
        ref_x, ref_y = src_transform.c, src_transform.f
        left = ref_x + round((cx - half - ref_x) / g) * g
        top = ref_y + round((cy + half - ref_y) / g) * g
    else:
        (ux,), (uy,) = transform(src_crs, crs, [cx], [cy])
        left = round((ux - half) / g) * g
        top = round((uy + half) / g) * g
    return TargetGrid(crs, Affine(g, 0, left, 0, -g, top), cfg.tile_size)


def _resampling_groups(cfg: HarmoniseConfig) -> dict[Resampling, list[int]]:
    """Positions in ``MS_BANDS`` grouped by the resampling their native resolution asks for."""
    groups: dict[Resampling, list[int]] = {}
    for position, name in enumerate(MS_BANDS):
        key = str(BY_NAME[name].resolution_m)
        if key not in cfg.resampling:
            raise ConfigError(
                f"data.harmonise.resampling has no entry for {key} m bands (needed by {name})"
            )
        groups.setdefault(Resampling[cfg.resampling[key]], []).append(position)
    return groups


def _pixel_size_m(
    src_crs: CRS, src_transform: Affine, shape: tuple[int, int], metric_crs: CRS
) -> list[float]:
    """Source pixel width and height in metres at the scene centre, measured in ``metric_crs``."""
    row, col = shape[0] / 2, shape[1] / 2
    pts = [
        src_transform @ (col, row),
        src_transform @ (col + 1, row),
        src_transform @ (col, row + 1),
    ]
    xs, ys = transform(src_crs, metric_crs, [p[0] for p in pts], [p[1] for p in pts])
    return [
        round(math.hypot(xs[1] - xs[0], ys[1] - ys[0]), 4),
        round(math.hypot(xs[2] - xs[0], ys[2] - ys[0]), 4),
    ]


# --- fMoW-RGB ----------------------------------------------------------------------------


def read_rgb(
    jpg: Path,
    meta_json: Path,
    grid: TargetGrid,
    cfg: HarmoniseConfig,
    polygon_wkt: str | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The fMoW-RGB partner as uint8 ``(3, R, R)`` R, G, B over ``grid``'s footprint, R =
    ``rgb_tile_size``; ``info["rgb_transform"]`` is the placement (full-resolution pixel → grid
    CRS affine) that :func:`rgb_coverage` and the co-registration check use.

    ``polygon_wkt`` (the CSV row's object polygon) is used when the JSON box has no
    ``raw_location``. Raises :class:`DataError` naming the file for a corrupt JPEG, an
    unreadable JSON or missing metadata.
    """
    if not jpg.is_file():
        raise DataError(jpg, "file not found")
    meta = _read_rgb_meta(meta_json)
    gsd = float(meta["gsd"])
    tile = grid.resized(cfg.rgb_tile_size)
    scale = _decode_scale(gsd, min(tile.transform.a, -tile.transform.e))
    pixels = read_jpeg(jpg, scale, cfg.rgb_max_pixels)
    full_h, full_w = int(meta["img_height"]), int(meta["img_width"])
    if (full_w, full_h) != (pixels.full_size[0], pixels.full_size[1]):
        raise DataError(
            meta_json,
            f"img_width × img_height {full_w}×{full_h} does not match the JPEG's "
            f"{pixels.full_size[0]}×{pixels.full_size[1]}",
        )
    placed = place_image(meta, meta_json, grid.crs, polygon_wkt, cfg.rgb_gsd_tolerance)
    if placed is None:
        log.debug("%s: no usable box/polygon, placing the image by its gsd", meta_json)
        cx, cy = grid.centre
        full_transform = Affine(gsd, 0, cx - full_w * gsd / 2, 0, -gsd, cy + full_h * gsd / 2)
        info: dict[str, Any] = {"rgb_registration": "gsd-centred", "rgb_polygon_source": None}
    else:
        full_transform, info = placed.transform, dict(placed.info)
    src_transform = full_transform @ Affine.scale(pixels.scale)
    out = np.zeros((3, tile.size, tile.size), dtype=np.uint8)
    reproject(
        pixels.data,
        out,
        src_transform=src_transform,
        src_crs=tile.crs,
        dst_transform=tile.transform,
        dst_crs=tile.crs,
        resampling=Resampling[cfg.rgb_resampling],
    )
    info |= {
        "rgb_transform": list(full_transform)[:6],
        "rgb_gsd_m_eff": round(tile.gsd_m_eff, 4),
        "rgb_gsd_json_m": gsd,
        "rgb_res_m": round(math.hypot(full_transform.a, full_transform.d), 4),
        "rgb_src_shape": [full_h, full_w],
        "rgb_decode_scale": pixels.scale,
    }
    return out, info


def rgb_coverage(tile: TargetGrid, rgb_transform: Affine, src_shape: tuple[int, int]) -> np.ndarray:
    """Bool ``(size, size)``: which pixel centres of ``tile`` the placed image covers.

    Computed from the placement rather than from the pixels, so a black image pixel is still
    covered and JPEG ringing outside the footprint is not.
    """
    centres = np.arange(tile.size) + 0.5
    cols, rows = np.meshgrid(centres, centres)
    x, y = tile.transform @ (cols, rows)
    col, row = ~rgb_transform @ (x, y)
    height, width = src_shape
    return (col >= 0) & (col < width) & (row >= 0) & (row < height)


def _read_rgb_meta(meta_json: Path) -> dict[str, Any]:
    if not meta_json.is_file():
        raise DataError(meta_json, "file not found")
    try:
        meta = json.loads(meta_json.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(meta_json, f"unreadable JSON: {e}") from e
    if not isinstance(meta, dict):
        raise DataError(
            meta_json, f"unreadable JSON: expected an object, got {type(meta).__name__}"
        )
    missing = [k for k in RGB_REQUIRED_KEYS if k not in meta]
    if missing:
        raise DataError(meta_json, f"missing key(s) {missing} in fMoW-RGB metadata")
    try:
        gsd, width, height = float(meta["gsd"]), int(meta["img_width"]), int(meta["img_height"])
    except (TypeError, ValueError) as e:
        raise DataError(meta_json, f"gsd, img_width and img_height must be numbers: {e}") from e
    if not (math.isfinite(gsd) and gsd > 0 and width > 0 and height > 0):
        raise DataError(meta_json, f"gsd {gsd}, img_width {width}, img_height {height} must be > 0")
    if not isinstance(meta["bounding_boxes"], list):
        raise DataError(meta_json, "bounding_boxes must be a list")
    return meta


def _decode_scale(gsd_src: float, gsd_grid: float) -> int:
    """The largest JPEG DCT reduction (1, 2, 4, 8) keeping pixels at most half a tile pixel."""
    ratio = gsd_grid / (2 * gsd_src)
    return max((s for s in (1, 2, 4, 8) if s <= ratio), default=1)
