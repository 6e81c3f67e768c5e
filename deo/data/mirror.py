"""A small synthetic mirror of the fMoW hosts, in the real file formats, for the embedded default.

What it writes under ``out`` (deterministic from ``MirrorConfig.seed``):

- ``sentinel/<archive>``: a gzip tar of 13-band uint16 GeoTIFFs named like fMoW-Sentinel's,
  in EPSG:4326 with ~10 m pixels (as Google Earth Engine exports them), DEFLATE-compressed,
  band descriptions B01…B12; plus one CSV per split with fMoW-Sentinel's columns;
- ``rgb/<split>/<cat>/<cat>_<loc>/<cat>_<loc>_<id>_rgb.{jpg,json}``: fMoW-RGB partners for
  ``image_id < 100``, north-up in the location's UTM zone at 0.6–2 m, with fMoW's JSON keys;
- ``bad_inputs.json`` and ``mirror.json``: the deliberately broken inputs (one of each of
  ``BAD_KINDS``; paths relative to ``sentinel/<archive_prefix>`` for scenes, to ``rgb/`` for
  partners) and a summary with the config. Two of them are partners that are well-formed but
  mis-registered (shifted, scaled): they show the same ground model, displaced.

Why the data are learnable: each location has ONE ground model, a continuous function of
metres east/north of the location centre in its UTM zone that mixes land covers with
plausible Sentinel-2 spectra (water, vegetation, crop, soil, concrete, asphalt, containers).
Each category lays the covers out its own way (runways and aprons, a patchwork of fields, a
lake, a shoreline with piers), so categories are separable from the 13 bands, and the same
ground is rendered into the Sentinel tile (area-averaged over 10 m pixels) and into the RGB
image (R, G, B from B04, B03, B02), so the RGB warped onto the Sentinel grid correlates with
Sentinel's visible bands. Each image varies by its timestamp (vegetation phenology), by
illumination and haze, and by sensor noise.

Locations are jittered around inland anchors on six continents, both hemispheres, so UTM zone
selection (north 326zz, south 327zz) is exercised. As in fMoW, location ids count per split
and category, so ``train/airport/airport_0`` and ``val/airport/airport_0`` differ.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import logging
import shutil
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
from affine import Affine
from PIL import Image
from rasterio.io import MemoryFile
from rasterio.warp import transform

from deo.config import MirrorConfig, to_dict
from deo.data.bands import SENTINEL2_BANDS, file_index
from deo.data.fmow import (
    CSV_COLUMNS,
    FIRST_MS_ONLY_IMAGE_ID,
    has_rgb_partner,
    rgb_relpaths,
    sentinel_relpath,
)
from deo.data.harmonise import utm_epsg
from deo.errors import ConfigError

log = logging.getLogger(__name__)

BAD_KINDS: tuple[str, ...] = (
    "truncated_tif",
    "wrong_band_count",
    "wrong_dtype",
    "all_nodata",
    "missing_tif",
    "corrupt_jpeg",
    "bad_json",
    "missing_rgb",
    "misregistered_shift",
    "misregistered_scale",
)
"""One deliberately broken input of each kind; the first five concern the GeoTIFF. The two
``misregistered_*`` partners are valid files whose metadata place them wrongly (see
:func:`_misregistration`): only the co-registration check can reject them."""

MISREGISTER_SHIFT_M = 150.0
"""How far a ``misregistered_shift`` image's ground lies from where its metadata say: 15
Sentinel pixels, about the half-size of an fMoW object box (e.g. the box of another object)."""
MISREGISTER_SCALE = 2.0
"""Ground size of a ``misregistered_scale`` image's pixel over the one its metadata imply, about
the image's top-left corner: what fitting the object's polygon to a box of another extent gives
(the image's centre lands a quarter of the image away)."""

S2_GSD_M = 10.0
SUPERSAMPLE = 2  # sub-samples per Sentinel pixel axis: the sensor integrates over its pixel
RGB_GSD_RANGE_M = (0.6, 2.0)
FIRST_DAY = datetime(2015, 8, 1, tzinfo=timezone.utc)  # acquisitions span ~6 years from here
ARCHIVE_MTIME = 1_577_836_800  # 2020-01-01: fixed so the archive's bytes depend on the seed only

# (lon, lat, ISO 3166 alpha-3) of inland places on six continents, both hemispheres.
ANCHORS: tuple[tuple[float, float, str], ...] = (
    (-3.70, 40.42, "ESP"),
    (13.40, 52.52, "DEU"),
    (-47.88, -15.79, "BRA"),
    (149.13, -35.28, "AUS"),
    (28.05, -26.20, "ZAF"),
    (77.21, 28.61, "IND"),
    (-99.13, 19.43, "MEX"),
    (36.82, -1.29, "KEN"),
    (-104.99, 39.74, "USA"),
    (106.92, 47.92, "MNG"),
    (-64.18, -31.42, "ARG"),
    (-8.00, 12.65, "MLI"),
    (104.07, 30.67, "CHN"),
    (21.01, 52.23, "POL"),
    (28.28, -15.41, "ZMB"),
    (133.88, -23.70, "AUS"),
)

COVERS: tuple[str, ...] = (
    "water",
    "vegetation",
    "crop",
    "soil",
    "concrete",
    "asphalt",
    "containers",
)
# Top-of-atmosphere-like reflectance × 10000 for B01 … B12 (13 bands, file order).
SPECTRA = np.array(
    [
        [1300, 1000, 800, 550, 450, 350, 320, 300, 270, 120, 10, 150, 100],
        [1150, 850, 1050, 650, 1350, 2800, 3400, 3700, 3800, 1100, 15, 2000, 1000],
        [1100, 750, 1150, 500, 1400, 3300, 4100, 4400, 4500, 1300, 15, 2200, 1050],
        [1400, 1250, 1550, 1850, 2100, 2300, 2450, 2550, 2650, 900, 25, 3300, 2700],
        [1700, 1800, 2000, 2200, 2300, 2400, 2450, 2500, 2550, 850, 30, 2900, 2600],
        [1300, 1000, 1000, 1050, 1100, 1150, 1200, 1250, 1250, 500, 20, 1450, 1350],
        [1500, 1300, 1200, 2300, 2000, 2100, 2150, 2200, 2250, 800, 25, 2600, 2300],
    ],
    dtype=np.float64,
)
SENESCENT = np.array(
    [1250, 1000, 1250, 1400, 1700, 2100, 2300, 2500, 2600, 900, 20, 3000, 2300], dtype=np.float64
)
_C = {name: i for i, name in enumerate(COVERS)}
_RGB_FROM = [file_index(b) for b in ("B04", "B03", "B02")]


@dataclass
class MirrorSummary:
    n_scenes: int  # rows in the split CSVs, broken scenes included
    n_rgb: int  # fMoW-RGB images written (the corrupt one included, the missing one not)
    bad_inputs: list[dict[str, str]]  # {"path": ..., "kind": ...}


@dataclass(frozen=True)
class Location:
    split: str
    category: str
    location_id: int
    seed: tuple[int, ...]
    lon: float
    lat: float
    country: str
    utm_epsg: int
    utm_xy: tuple[float, float]
    half_size_m: tuple[float, float]  # the object's half extent east, north
    envelope: tuple[float, float, float, float]  # the object's (west, east, south, north)
    folder: str = ""  # the split's folder in the archive when it differs (test -> test_gt)
    rgb_folder: str = ""  # the obfuscated fMoW-RGB folder of a mapped split ("test/<id>")


@dataclass(frozen=True)
class Scene:
    location: Location
    image_id: int
    timestamp: datetime

    @property
    def seed(self) -> tuple[int, ...]:
        return (*self.location.seed, self.image_id)

    @property
    def tif_relpath(self) -> str:
        loc = self.location
        return sentinel_relpath(
            loc.split, loc.category, loc.location_id, self.image_id, loc.folder or None
        )

    @property
    def rgb_relpaths(self) -> tuple[str, str]:
        loc = self.location
        if loc.rgb_folder:
            base = f"{loc.rgb_folder}/{loc.rgb_folder.rsplit('/', 1)[-1]}_{self.image_id}_rgb"
            return base + ".jpg", base + ".json"
        return rgb_relpaths(loc.split, loc.category, loc.location_id, self.image_id)


def write_mirror(
    cfg: MirrorConfig,
    out: Path,
    *,
    csvs: dict[str, str],
    archive: str,
    archive_prefix: str,
    folders: Mapping[str, str] | None = None,
    rgb_mappings: Mapping[str, str] | None = None,
) -> MirrorSummary:
    """Write the mirror under ``out`` and return what was written.

    ``folders`` (``data.sentinel.folders``) names a split's archive folder where it differs
    from the split; a split in ``rgb_mappings`` (``data.rgb.mappings``) gets its fMoW-RGB
    partners in obfuscated folders and the named mapping file, as fMoW's test split.
    ``out/rgb`` is replaced as a whole, so a rerun never leaves a stale partner where the
    mirror declares one missing.
    """
    if not csvs:
        raise ConfigError("data.sentinel.csvs: the mirror needs at least one split")
    scenes = _apply_layout(_plan(cfg, list(csvs)), folders or {}, rgb_mappings or {})
    bad = _assign_bad_inputs(scenes, cfg)
    sentinel_dir, rgb_dir = out / "sentinel", out / "rgb"
    sentinel_dir.mkdir(parents=True, exist_ok=True)
    if rgb_dir.exists():
        shutil.rmtree(rgb_dir)
    n_rgb = 0
    member = ("./" if cfg.member_dot_slash else "") + archive_prefix
    with _tar_writer(sentinel_dir / archive) as add:
        for i, scene in enumerate(scenes):
            kind = bad.get(scene.tif_relpath)
            if kind != "missing_tif":
                dtype = cfg.s2_dtypes[i % len(cfg.s2_dtypes)]
                add(member + scene.tif_relpath, _geotiff_bytes(scene, cfg, kind, dtype))
            if has_rgb_partner(scene.image_id) and kind != "missing_rgb":
                variant = cfg.rgb_json_variants[i % len(cfg.rgb_json_variants)]
                _write_rgb(scene, rgb_dir, cfg.rgb_size_px, kind, variant)
                n_rgb += 1
    _write_rgb_mappings(scenes, rgb_dir, rgb_mappings or {})
    for split, name in csvs.items():
        _write_csv(sentinel_dir / name, [s for s in scenes if s.location.split == split])
    bad_inputs = [_bad_entry(scenes, relpath, kind) for relpath, kind in bad.items()]
    summary = MirrorSummary(n_scenes=len(scenes), n_rgb=n_rgb, bad_inputs=bad_inputs)
    (out / "bad_inputs.json").write_text(json.dumps(bad_inputs, indent=2) + "\n")
    record = {
        **asdict(summary),
        "splits": dict(Counter(s.location.split for s in scenes)),
        "archive": archive,
        "archive_prefix": archive_prefix,
        "csvs": csvs,
        "config": to_dict(cfg),
    }
    (out / "mirror.json").write_text(json.dumps(record, indent=2) + "\n")
    log.info(
        "mirror: %d scenes, %d RGB partners, %d bad inputs in %s", len(scenes), n_rgb, len(bad), out
    )
    return summary


# --- planning ----------------------------------------------------------------------------


def _plan(cfg: MirrorConfig, splits: list[str]) -> list[Scene]:
    """All scenes, in a stable order: locations spread over splits, most of them in train."""
    first = "train" if "train" in splits else splits[0]
    cycle = [first] * 3 + [s for s in splits if s != first]
    next_id: Counter[tuple[str, str]] = Counter()
    image_ids = [*range(cfg.images_per_location)]
    image_ids += [FIRST_MS_ONLY_IMAGE_ID + i for i in range(cfg.ms_only_images_per_location)]
    scenes = []
    for c, category in enumerate(cfg.categories):
        for j in range(cfg.locations_per_category):
            split = cycle[(j + c) % len(cycle)]
            location_id = next_id[split, category]
            next_id[split, category] += 1
            loc = _location(cfg.seed, c, j, split, category, location_id)
            rng = np.random.default_rng([*loc.seed, 1])
            days = rng.permutation(2200)[: len(image_ids)]
            for image_id, day in zip(image_ids, days, strict=True):
                seconds = int(rng.integers(9 * 3600, 12 * 3600))
                when = FIRST_DAY + timedelta(days=int(day), seconds=seconds)
                scenes.append(Scene(loc, image_id, when))
    return scenes


def _apply_layout(
    scenes: list[Scene], folders: Mapping[str, str], rgb_mappings: Mapping[str, str]
) -> list[Scene]:
    """Scenes whose split has its own archive folder, or obfuscated fMoW-RGB folders."""
    out = []
    for scene in scenes:
        loc = scene.location
        rgb_folder = ""
        if loc.split in rgb_mappings:
            secret = zlib.crc32(f"{loc.category}_{loc.location_id}".encode()) % 10_000_000
            rgb_folder = f"{loc.split}/{secret:07d}"
        loc = dataclasses.replace(loc, folder=folders.get(loc.split, ""), rgb_folder=rgb_folder)
        out.append(dataclasses.replace(scene, location=loc))
    return out


def _write_rgb_mappings(
    scenes: list[Scene], rgb_dir: Path, rgb_mappings: Mapping[str, str]
) -> None:
    """fMoW's ``<split>_gt_mapping.json``: ground-truth location folder -> obfuscated folder."""
    for split, name in rgb_mappings.items():
        seen = {
            (s.location.category, s.location.location_id): s.location.rgb_folder
            for s in scenes
            if s.location.split == split
        }
        entries = [
            {"input": f"{split}_gt/{cat}/{cat}_{loc}", "output": folder}
            for (cat, loc), folder in sorted(seen.items())
        ]
        (rgb_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (rgb_dir / name).write_text(json.dumps(entries, indent=1) + "\n")


def _location(seed: int, c: int, j: int, split: str, category: str, location_id: int) -> Location:
    """A location near an anchor, with its UTM zone and the object's lon/lat envelope."""
    key = (seed, c, j)
    rng = np.random.default_rng([*key, 0])
    a_lon, a_lat, country = ANCHORS[(c * 7 + j) % len(ANCHORS)]
    lon = a_lon + float(rng.uniform(-0.3, 0.3))
    lat = a_lat + float(rng.uniform(-0.3, 0.3))
    epsg = utm_epsg(lon, lat)
    (ux,), (uy,) = transform("EPSG:4326", f"EPSG:{epsg}", [lon], [lat])
    hx, hy = (float(v) for v in rng.uniform(40, 110, size=2))
    lons, lats = transform(
        f"EPSG:{epsg}",
        "EPSG:4326",
        [ux - hx, ux + hx, ux + hx, ux - hx],
        [uy - hy, uy - hy, uy + hy, uy + hy],
    )
    west, east, south, north = (round(v, 7) for v in (min(lons), max(lons), min(lats), max(lats)))
    return Location(
        split,
        category,
        location_id,
        key,
        lon,
        lat,
        country,
        epsg,
        (ux, uy),
        (hx, hy),
        (west, east, south, north),
    )


def _assign_bad_inputs(scenes: list[Scene], cfg: MirrorConfig) -> dict[str, str]:
    """Tif relpath → bad kind: one distinct scene with an RGB partner per kind."""
    if not cfg.bad_inputs:
        return {}
    candidates = [s for s in scenes if has_rgb_partner(s.image_id)]
    if len(candidates) < len(BAD_KINDS):
        raise ConfigError(
            f"data.mirror: bad_inputs needs at least {len(BAD_KINDS)} scenes with an RGB partner, "
            f"the mirror has {len(candidates)}"
        )
    order = np.random.default_rng([cfg.seed, 2]).permutation(len(candidates))
    return {candidates[i].tif_relpath: kind for i, kind in zip(order, BAD_KINDS, strict=False)}


def _bad_entry(scenes: list[Scene], tif_relpath: str, kind: str) -> dict[str, str]:
    """The listed path: the tif's (below the archive prefix) or the RGB file's (below rgb/)."""
    scene = next(s for s in scenes if s.tif_relpath == tif_relpath)
    jpg, meta = scene.rgb_relpaths
    partner = {"corrupt_jpeg": jpg, "missing_rgb": jpg, "bad_json": meta}
    partner |= {"misregistered_shift": jpg, "misregistered_scale": jpg}
    path = partner.get(kind, tif_relpath)
    return {"path": path, "kind": kind}


# --- the ground model --------------------------------------------------------------------


@dataclass(frozen=True)
class _Samples:
    """A regular lattice of ground points (metres east/north of the location centre).

    Point (row, col) is ``origin + col * col_step + row * row_step``. Both sensors sample the
    ground on such a lattice (the RGB image axis-aligned, the Sentinel pixels through the local
    lon/lat → UTM affine), which lets the noise fields be computed as matrix products.
    """

    origin: tuple[float, float]
    col_step: tuple[float, float]
    row_step: tuple[float, float]
    shape: tuple[int, int]  # (rows, cols)

    def xy(self) -> tuple[np.ndarray, np.ndarray]:
        """Flattened (row-major) x and y of every point."""
        rows, cols = np.meshgrid(np.arange(self.shape[0]), np.arange(self.shape[1]), indexing="ij")
        x = self.origin[0] + cols * self.col_step[0] + rows * self.row_step[0]
        y = self.origin[1] + cols * self.col_step[1] + rows * self.row_step[1]
        return x.ravel().astype(np.float32), y.ravel().astype(np.float32)


def _noise(
    samples: _Samples, rng: np.random.Generator, wavelengths: tuple[float, float]
) -> np.ndarray:
    """Smooth random field in about [-1, 1] on the lattice: a sum of random plane waves.

    On a lattice each wave's phase is ``p(col) + q(row)``, and sin(p + q) splits into
    sin p cos q + cos p sin q, so the sum over waves is two small matrix products.
    """
    n = 8
    k = 2 * np.pi / rng.uniform(*wavelengths, size=n)
    theta = rng.uniform(0, 2 * np.pi, size=n)
    kx, ky = k * np.cos(theta), k * np.sin(theta)
    gamma = kx * samples.origin[0] + ky * samples.origin[1] + rng.uniform(0, 2 * np.pi, size=n)
    p = np.outer(np.arange(samples.shape[1]), kx * samples.col_step[0] + ky * samples.col_step[1])
    q = np.outer(np.arange(samples.shape[0]), kx * samples.row_step[0] + ky * samples.row_step[1])
    p += gamma
    field = np.cos(q) @ np.sin(p).T + np.sin(q) @ np.cos(p).T
    return (field.ravel() * np.sqrt(2.0 / n)).astype(np.float32)


def _step(d: np.ndarray, edge_m: float = 2.0) -> np.ndarray:
    """A smooth 0→1 step across an edge ``edge_m`` wide: keeps the ground continuous."""
    return 0.5 * (1.0 + np.tanh(d / edge_m))


def _inside_box(u: np.ndarray, v: np.ndarray, half_u: float, half_v: float) -> np.ndarray:
    return _step(half_u - np.abs(u)) * _step(half_v - np.abs(v))


class _Canvas:
    """Cover weights per ground point that always sum to one; layouts paint covers over it."""

    def __init__(self, samples: _Samples) -> None:
        self.samples = samples
        self.x, self.y = samples.xy()
        self.w = np.zeros((len(COVERS), self.x.size), dtype=np.float32)

    def paint(self, cover: str, amount: np.ndarray) -> None:
        self.w *= 1.0 - amount
        self.w[_C[cover]] += amount

    def rotated(self, angle: float) -> tuple[np.ndarray, np.ndarray]:
        """Coordinates along and across a layout's main axis at ``angle`` from east."""
        c, s = np.cos(angle), np.sin(angle)
        return c * self.x + s * self.y, -s * self.x + c * self.y


def _background(canvas: _Canvas, rng: np.random.Generator) -> None:
    """Countryside shared by all categories: vegetation and soil, with some town."""
    bias = rng.uniform(-0.5, 0.5)
    green = _step(_noise(canvas.samples, rng, (300, 900)) + bias, 0.4)
    canvas.w[_C["vegetation"]] = green
    canvas.w[_C["soil"]] = 1.0 - green
    canvas.paint("concrete", 0.6 * _step(_noise(canvas.samples, rng, (150, 400)) - 1.2, 0.3))


def _airport(canvas: _Canvas, half: tuple[float, float], rng: np.random.Generator) -> None:
    """A runway with a parallel taxiway, a concrete apron and parked aircraft in grass."""
    u, v = canvas.rotated(rng.uniform(0, np.pi))
    a = max(half)
    length, width = rng.uniform(900, 1600), rng.uniform(35, 55)
    canvas.paint("vegetation", _inside_box(u, v, length / 2 + 150, a + 250))
    canvas.paint("asphalt", _inside_box(u, v, length / 2, width / 2))
    canvas.paint("asphalt", _inside_box(u, v - width / 2 - 70, length / 2 - 60, 11))
    apron_v = width / 2 + 110 + a / 2
    canvas.paint("concrete", _inside_box(u, v - apron_v, a, a / 2))
    canvas.paint("containers", 0.7 * _inside_box(u, v - apron_v - a / 2 - 30, a * 0.8, 25))


def _crop_field(canvas: _Canvas, half: tuple[float, float], rng: np.random.Generator) -> None:
    """A patchwork of fields, each with its own crop cover, divided by soil tracks."""
    u, v = canvas.rotated(rng.uniform(0, np.pi / 2))
    cell = rng.uniform(50, 110)
    k = 16
    green = rng.uniform(0, 1, size=(k, k))
    field = green[np.floor(u / cell).astype(int) % k, np.floor(v / cell).astype(int) % k]
    cover = np.where(field > 0.3, 0.35 + 0.65 * field, 0.05)
    du = np.abs(u / cell - np.round(u / cell)) * cell
    dv = np.abs(v / cell - np.round(v / cell)) * cell
    farmland = _inside_box(u, v, 6 * max(half), 6 * max(half))
    canvas.paint("soil", farmland)
    canvas.paint("crop", farmland * cover * _step(np.minimum(du, dv) - 3.0))


def _lake_or_pond(canvas: _Canvas, half: tuple[float, float], rng: np.random.Generator) -> None:
    """Open water with a wavy shore inside a ring of vegetation."""
    rho = np.hypot(canvas.x / half[0], canvas.y / half[1])
    phi = np.arctan2(canvas.y, canvas.x)
    p1, p2 = rng.uniform(0, 2 * np.pi, size=2)
    edge = 1.0 + 0.15 * np.sin(2 * phi + p1) + 0.08 * np.sin(3 * phi + p2)
    scale = min(half)
    canvas.paint("vegetation", _step((edge + 0.35 - rho) * scale))
    canvas.paint("water", _step((edge - rho) * scale))


def _port(canvas: _Canvas, half: tuple[float, float], rng: np.random.Generator) -> None:
    """A shoreline with a concrete quay, container stacks and piers reaching into the water."""
    u, v = canvas.rotated(rng.uniform(0, 2 * np.pi))
    a = max(half)
    shore = 0.2 * a * np.sin(u / a * 1.3 + rng.uniform(0, 2 * np.pi))
    canvas.paint("concrete", _step(v - shore + 3 * a) * _step(shore - v))
    stacks = _inside_box(u, v - shore + a, 1.5 * a, a / 2) * _step(np.sin(u / 9.0), 0.3)
    canvas.paint("containers", stacks)
    canvas.paint("water", _step(v - shore))
    for pier_u in rng.uniform(-2 * a, 2 * a, size=4):
        reach = rng.uniform(0.8, 1.6) * a
        pier = _inside_box(u - pier_u, v - shore - reach / 2, rng.uniform(12, 25), reach / 2)
        canvas.paint("concrete", pier * _step(v - shore + 5))


def _generic(
    canvas: _Canvas, half: tuple[float, float], rng: np.random.Generator, name: str
) -> None:
    """Any other category: a name-fixed pair of covers in blobs around the object."""
    named = np.random.default_rng(zlib.crc32(name.encode()))
    main, accent = named.choice(len(COVERS), size=2, replace=False)
    site = _step((1.0 - np.hypot(canvas.x / half[0], canvas.y / half[1])) * min(half), 10.0)
    canvas.paint(COVERS[main], site)
    canvas.paint(COVERS[accent], site * _step(_noise(canvas.samples, rng, (40, 120)), 0.2))


_LAYOUTS: dict[str, Callable[[_Canvas, tuple[float, float], np.random.Generator], None]] = {
    "airport": _airport,
    "crop_field": _crop_field,
    "lake_or_pond": _lake_or_pond,
    "port": _port,
}


def _reflectance(scene: Scene, samples: _Samples) -> np.ndarray:
    """Ground reflectance (13, rows, cols) on the lattice.

    The layout depends on the location only; the season of ``scene.timestamp`` greens or
    browns the vegetation, and a fine texture modulates brightness.
    """
    loc = scene.location
    canvas = _Canvas(samples)
    layout_rng = np.random.default_rng([*loc.seed, 3])
    _background(canvas, layout_rng)
    layout = _LAYOUTS.get(loc.category)
    if layout is None:
        _generic(canvas, loc.half_size_m, layout_rng, loc.category)
    else:
        layout(canvas, loc.half_size_m, layout_rng)
    spectra = SPECTRA.copy()
    green = _greenness(scene)
    spectra[_C["vegetation"]] = green * SPECTRA[_C["vegetation"]] + (1 - green) * SENESCENT
    crop_green = green**2
    spectra[_C["crop"]] = crop_green * SPECTRA[_C["crop"]] + (1 - crop_green) * SPECTRA[_C["soil"]]
    texture = 1.0 + 0.06 * _noise(samples, np.random.default_rng([*loc.seed, 4]), (15, 60))
    return ((spectra.T.astype(np.float32) @ canvas.w) * texture).reshape(-1, *samples.shape)


def _greenness(scene: Scene) -> float:
    """Vegetation vigour in [0.3, 1] from the day of year, peaking in local summer."""
    peak = 180 if scene.location.lat >= 0 else 0
    day = scene.timestamp.timetuple().tm_yday
    return 0.65 + 0.35 * float(np.cos(2 * np.pi * (day - peak) / 365.25))


# --- Sentinel-2 GeoTIFF ------------------------------------------------------------------


def _geotiff_bytes(scene: Scene, cfg: MirrorConfig, kind: str | None, dtype: str) -> bytes:
    """The scene as a GeoTIFF file's bytes, broken as ``kind`` asks for the tif kinds.

    ``dtype`` float32 stores the same DNs as floats (the real tiles' dtype is undocumented).
    """
    pixels, geo = _sentinel_pixels(scene, cfg.size_px, cfg.size_dist)
    if dtype == "float32":
        pixels = pixels.astype(np.float32)
    names = [b.name for b in SENTINEL2_BANDS]
    if kind == "wrong_band_count":
        keep = [i for i, name in enumerate(names) if name != "B10"]
        pixels, names = pixels[keep], [names[i] for i in keep]
    elif kind == "wrong_dtype":
        pixels = (pixels / 10_000).astype(np.float32)
    elif kind == "all_nodata":
        pixels = np.zeros_like(pixels)
    count, height, width = pixels.shape
    with MemoryFile() as mem:
        with mem.open(
            driver="GTiff",
            width=width,
            height=height,
            count=count,
            dtype=pixels.dtype.name,
            crs="EPSG:4326",
            transform=geo,
            compress="deflate",
        ) as dst:
            dst.write(pixels)
            dst.descriptions = tuple(names)
        data = bytes(mem.read())
    return data[: len(data) // 2] if kind == "truncated_tif" else data


def _sentinel_pixels(
    scene: Scene, size_px: tuple[int, int], size_dist: str = "uniform"
) -> tuple[np.ndarray, Affine]:
    """uint16 (13, h, w) reflectance DNs of the scene and its EPSG:4326 geotransform.

    Pixels are ~10 m at the scene's latitude, the scene roughly centred on the location; each
    pixel averages ``SUPERSAMPLE``² ground samples, then illumination, haze and noise apply.
    """
    loc = scene.location
    rng = np.random.default_rng([*scene.seed, 5])
    lo, hi = sorted(size_px)
    if size_dist == "log_uniform":  # fMoW-Sentinel: mostly small crops, a few large ones
        sides = np.exp(rng.uniform(np.log(lo), np.log(hi + 1), size=2))
        height, width = (min(int(v), hi) for v in sides)
    else:
        height, width = (int(v) for v in rng.integers(lo, hi + 1, size=2))
    res_lon = S2_GSD_M / (111_320.0 * np.cos(np.radians(loc.lat)))
    res_lat = S2_GSD_M / 110_574.0
    jx, jy = rng.uniform(-1.5, 1.5, size=2)
    west = loc.lon - (width / 2 + jx) * res_lon
    north = loc.lat + (height / 2 + jy) * res_lat
    geo = Affine(res_lon, 0.0, west, 0.0, -res_lat, north)
    coef = _ground_affine(loc, (west, west + width * res_lon), (north - height * res_lat, north))
    sub = 1.0 / SUPERSAMPLE
    d_lon, d_lat = west - loc.lon + 0.5 * sub * res_lon, north - loc.lat - 0.5 * sub * res_lat
    origin = np.array([d_lon, d_lat, 1.0]) @ coef
    col_step, row_step = coef[0] * res_lon * sub, -coef[1] * res_lat * sub
    samples = _Samples(
        (float(origin[0]), float(origin[1])),
        (float(col_step[0]), float(col_step[1])),
        (float(row_step[0]), float(row_step[1])),
        (height * SUPERSAMPLE, width * SUPERSAMPLE),
    )
    refl = _reflectance(scene, samples).reshape(-1, height, SUPERSAMPLE, width, SUPERSAMPLE)
    refl = refl.mean(axis=(2, 4))
    wavelengths = np.array([b.wavelength_nm for b in SENTINEL2_BANDS])
    gain = rng.uniform(0.92, 1.08) * rng.uniform(0.97, 1.03, size=len(wavelengths))
    haze = rng.uniform(0, 120) * (490.0 / wavelengths) ** 2
    dn = refl * gain[:, None, None] + haze[:, None, None]
    dn += rng.standard_normal(dn.shape, dtype=np.float32) * (0.01 * dn + 10.0)
    return np.clip(np.rint(dn), 1, np.iinfo(np.uint16).max).astype(np.uint16), geo


def _ground_affine(
    loc: Location, lon_range: tuple[float, float], lat_range: tuple[float, float]
) -> np.ndarray:
    """(3, 2) coefficients taking (lon - lon0, lat - lat0, 1) to metres east/north of the centre.

    Over a scene (< 2 km) UTM is affine in lon/lat to a few millimetres, so a fit on nine
    exactly projected points stands in for projecting every sample.
    """
    glon, glat = (
        g.ravel() for g in np.meshgrid(np.linspace(*lon_range, 3), np.linspace(*lat_range, 3))
    )
    ux, uy = transform("EPSG:4326", f"EPSG:{loc.utm_epsg}", glon.tolist(), glat.tolist())
    design = np.column_stack([glon - loc.lon, glat - loc.lat, np.ones(glon.size)])
    target = np.column_stack([np.asarray(ux) - loc.utm_xy[0], np.asarray(uy) - loc.utm_xy[1]])
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    return coef


# --- fMoW-RGB ----------------------------------------------------------------------------


def _write_rgb(
    scene: Scene,
    rgb_dir: Path,
    rgb_size_px: tuple[int, int],
    kind: str | None,
    variant: str = "object",
) -> None:
    """The partner JPEG and its fMoW JSON, north-up in the location's UTM zone.

    The object sits near the image centre and fits inside it; its box is the pixel envelope of
    its lon/lat polygon, as in fMoW. ``variant`` shapes ``bounding_boxes`` as real files do
    (:func:`_bounding_boxes`).
    """
    loc = scene.location
    rng = np.random.default_rng([*scene.seed, 6])
    lo, hi = sorted(rgb_size_px)
    width, height = (int(v) for v in rng.integers(lo, hi + 1, size=2))
    fits = 2 * max(loc.half_size_m) / (0.7 * min(width, height))
    gsd = round(max(float(rng.uniform(*RGB_GSD_RANGE_M)), fits), 4)
    ox = width / 2 + float(rng.uniform(-0.1, 0.1)) * width
    oy = height / 2 + float(rng.uniform(-0.1, 0.1)) * height
    samples = _misregistration(
        _Samples(((0.5 - ox) * gsd, (oy - 0.5) * gsd), (gsd, 0.0), (0.0, -gsd), (height, width)),
        kind,
        np.random.default_rng([*scene.seed, 7]),
    )
    refl = _reflectance(scene, samples)[_RGB_FROM]
    level = 255 * np.clip(refl * np.float32(rng.uniform(0.9, 1.1) / 3000), 0, 1) ** np.float32(
        1 / 1.2
    )
    level += 2.0 * rng.standard_normal(level.shape, dtype=np.float32)
    image = np.clip(np.rint(level), 0, 255).astype(np.uint8)
    west, east, south, north = loc.envelope
    ux, uy = transform(
        "EPSG:4326", f"EPSG:{loc.utm_epsg}", [west, east, east, west], [north, north, south, south]
    )
    cols = (np.asarray(ux) - loc.utm_xy[0]) / gsd + ox
    rows = oy - (np.asarray(uy) - loc.utm_xy[1]) / gsd
    bx, by = int(np.floor(cols.min())), int(np.floor(rows.min()))
    box = [bx, by, int(np.ceil(cols.max())) - bx, int(np.ceil(rows.max())) - by]
    jpg_rel, json_rel = scene.rgb_relpaths
    corners_x = [(-ox) * gsd, (width - ox) * gsd]
    corners_y = [oy * gsd, (oy - height) * gsd]
    flon, flat = transform(
        f"EPSG:{loc.utm_epsg}",
        "EPSG:4326",
        [loc.utm_xy[0] + corners_x[i] for i in (0, 1, 1, 0)],
        [loc.utm_xy[1] + corners_y[i] for i in (0, 0, 1, 1)],
    )
    footprint = (min(flon), max(flon), min(flat), max(flat))
    object_entry = {
        "box": box,
        "category": loc.category,
        "ID": zlib.crc32(jpg_rel.encode()) % 1_000_000,
        "raw_location": polygon_wkt(loc.envelope),
    }
    meta = {
        "bounding_boxes": _bounding_boxes(variant, object_entry, (width, height), footprint),
        "cloud_cover": int(rng.integers(0, 16)),
        "country_code": loc.country,
        "gsd": gsd,
        "img_height": height,
        "img_width": width,
        "timestamp": _iso(scene.timestamp),
        "utm": _utm_zone_name(loc.lon, loc.lat),
    }
    jpg, meta_json = rgb_dir / jpg_rel, rgb_dir / json_rel
    jpg.parent.mkdir(parents=True, exist_ok=True)
    if kind == "corrupt_jpeg":
        jpg.write_bytes(rng.bytes(4096))
    else:
        Image.fromarray(image.transpose(1, 2, 0)).save(jpg, format="JPEG", quality=90)
    text = json.dumps(meta, indent=2)
    meta_json.write_text(text[: len(text) // 2] if kind == "bad_json" else text + "\n")


def _misregistration(samples: _Samples, kind: str | None, rng: np.random.Generator) -> _Samples:
    """The ground lattice a ``misregistered_*`` image really shows (others: ``samples``).

    The metadata keep describing ``samples``, so the image is rendered from the same ground
    model (it still correlates with Sentinel-2 where placed right) but displaced: shifted by
    ``MISREGISTER_SHIFT_M`` in a random direction, or scaled about its top-left corner.
    """
    (x0, y0), (cx, cy), (rx, ry) = samples.origin, samples.col_step, samples.row_step
    if kind == "misregistered_shift":
        angle = rng.uniform(0, 2 * np.pi)
        dx, dy = MISREGISTER_SHIFT_M * np.cos(angle), MISREGISTER_SHIFT_M * np.sin(angle)
        return _Samples((x0 + dx, y0 + dy), samples.col_step, samples.row_step, samples.shape)
    if kind == "misregistered_scale":
        k = MISREGISTER_SCALE  # about the top-left corner, as a box of another extent scales it
        return _Samples((x0, y0), (k * cx, k * cy), (k * rx, k * ry), samples.shape)
    return samples


def _bounding_boxes(
    variant: str,
    entry: dict,
    size: tuple[int, int],
    footprint: tuple[float, float, float, float],
) -> list[dict]:
    """fMoW's ``bounding_boxes`` as the releases hold them.

    ``object``: the object's box with its polygon. ``id_minus_one_first``: first an ``ID: -1``
    entry spanning the whole image with the image's footprint (ssl4rs asserts such an entry
    leads every v1.2.1 ground-truth JSON), then the object's. ``footprint_location``: the
    object's box with the *image's* footprint as ``raw_location``. ``no_location``: no
    ``raw_location`` (the challenge's test JSONs lost their GPS fields).
    """
    if variant == "id_minus_one_first":
        whole = {
            "box": [0, 0, size[0], size[1]],
            "category": entry["category"],
            "ID": -1,
            "raw_location": polygon_wkt(footprint),
        }
        return [whole, entry]
    if variant == "footprint_location":
        return [{**entry, "raw_location": polygon_wkt(footprint)}]
    if variant == "no_location":
        return [{k: v for k, v in entry.items() if k != "raw_location"}]
    return [entry]


def _utm_zone_name(lon: float, lat: float) -> str:
    """fMoW's ``utm`` value: zone number and latitude band letter, e.g. ``33U``."""
    zone = int((lon + 180) // 6) % 60 + 1
    band = "CDEFGHJKLMNPQRSTUVWX"[min(int((lat + 80) // 8), 19)]
    return f"{zone}{band}"


# --- CSVs and archive ---------------------------------------------------------------------


def polygon_wkt(envelope: tuple[float, float, float, float]) -> str:
    """The object's lon/lat box as fMoW writes it: a closed WKT ring, lon before lat."""
    west, east, south, north = (f"{v:.7f}" for v in envelope)
    ring = [(west, north), (east, north), (east, south), (west, south), (west, north)]
    return "POLYGON ((" + ", ".join(f"{lon} {lat}" for lon, lat in ring) + "))"


def _iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _write_csv(path: Path, scenes: list[Scene]) -> None:
    rows = sorted(
        (
            s.location.category,
            s.location.location_id,
            s.image_id,
            _iso(s.timestamp),
            polygon_wkt(s.location.envelope),
        )
        for s in scenes
    )
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        writer.writerows(rows)


@contextmanager
def _tar_writer(path: Path) -> Iterator[Callable[[str, bytes], None]]:
    """A gzip tar whose bytes depend only on what is added (no wall-clock times inside)."""
    with (
        open(path, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=1) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar,
    ):

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), ARCHIVE_MTIME, 0o644
            tar.addfile(info, io.BytesIO(data))

        yield add
