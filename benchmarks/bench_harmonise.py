"""Per-scene harmonisation cost against a bare read of the same GeoTIFFs, on one core.

Writes a synthetic mirror (``deo.data.mirror``, no broken inputs) of about ``--scenes`` scenes
to a temporary directory, extracts it, then times three passes over the same files:

- bare read: ``rasterio.open(path).read()`` of all 13 bands, the floor any reader pays;
- ``read_s2``: validation, the 10 model bands warped onto the ``--tile`` UTM grid (``--tiling``);
- ``read_s2`` + ``read_rgb``: plus the RGB partner decoded and warped onto ``--rgb-tile`` px
  over the same footprint where it exists;
- the same + the co-registration check (``deo.data.coreg``) of each pair.

Each pass runs ``--repeats`` times, interleaved, after one warm-up round (files in the page
cache), and its best time is reported. Everything runs in this one process, so scenes/s is per core.

    python benchmarks/bench_harmonise.py --scenes 256 --tile 64
"""

from __future__ import annotations

import argparse
import logging
import math
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import rasterio

from deo.config import HarmoniseConfig, MirrorConfig, SentinelSource
from deo.data.coreg import check_partner
from deo.data.harmonise import read_rgb, read_s2
from deo.data.mirror import write_mirror

log = logging.getLogger("bench_harmonise")

Scene = tuple[Path, Path | None, Path | None]  # tif, partner jpg, partner json


def build(root: Path, n_scenes: int, seed: int) -> list[Scene]:
    """A mirror of at least ``n_scenes`` scenes, extracted; its scenes with their partners."""
    base = MirrorConfig(seed=seed, bad_inputs=False)
    per_location = base.images_per_location + base.ms_only_images_per_location
    locations = math.ceil(n_scenes / (len(base.categories) * per_location))
    cfg = MirrorConfig(seed=seed, bad_inputs=False, locations_per_category=locations)
    source = SentinelSource()
    write_mirror(
        cfg, root, csvs=source.csvs, archive=source.archive, archive_prefix=source.archive_prefix
    )
    with tarfile.open(root / "sentinel" / source.archive) as tar:
        tar.extractall(root / "scenes", filter="data")
    scene_root = root / "scenes" / source.archive_prefix
    scenes = []
    for tif in sorted(scene_root.rglob("*.tif")):
        stem = tif.relative_to(scene_root).with_suffix("")
        jpg = root / "rgb" / f"{stem}_rgb.jpg"
        partner = jpg.exists()
        scenes.append(
            (tif, jpg if partner else None, jpg.with_suffix(".json") if partner else None)
        )
    return scenes


def best_times(passes: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Best wall time of each pass over ``repeats`` rounds, after one warm-up round.

    Rounds interleave the passes, so a busy spell on a shared machine hits them alike.
    """
    for run in passes.values():
        run()
    best = dict.fromkeys(passes, math.inf)
    for _ in range(repeats):
        for name, run in passes.items():
            t0 = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=128, help="about this many scenes")
    parser.add_argument("--tile", type=int, default=64, help="harmonised tile size (pixels)")
    parser.add_argument("--rgb-tile", type=int, default=128, help="aerial tile size (pixels)")
    parser.add_argument("--tiling", choices=["resize", "fixed_gsd"], default="resize")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("deo").setLevel(logging.WARNING)
    cfg = HarmoniseConfig(
        tile_size=args.tile,
        rgb_tile_size=args.rgb_tile,
        tiling=args.tiling,
        max_nodata_fraction=1.0,
    )

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        scenes = build(Path(tmp), args.scenes, args.seed)
        n_rgb = sum(jpg is not None for _, jpg, _ in scenes)
        log.info(
            "mirror: %d scenes (%d with an RGB partner) written in %.1f s",
            len(scenes),
            n_rgb,
            time.perf_counter() - t0,
        )

        def bare() -> None:
            for tif, _, _ in scenes:
                with rasterio.open(tif) as src:
                    src.read()

        def s2_only() -> None:
            for tif, _, _ in scenes:
                read_s2(tif, cfg)

        def s2_and_rgb() -> None:
            for tif, jpg, meta in scenes:
                _, grid, _ = read_s2(tif, cfg)
                if jpg is not None and meta is not None:
                    read_rgb(jpg, meta, grid, cfg)

        def with_check() -> None:
            for tif, jpg, meta in scenes:
                s2, grid, _ = read_s2(tif, cfg)
                if jpg is not None and meta is not None:
                    rgb, info = read_rgb(jpg, meta, grid, cfg)
                    check_partner(s2, grid, rgb, info, cfg, str(jpg))

        passes = {
            "bare `rasterio.open().read()`": bare,
            "`read_s2`": s2_only,
            "`read_s2` + `read_rgb`": s2_and_rgb,
            "`read_s2` + `read_rgb` + co-registration check": with_check,
        }
        timings = best_times(passes, args.repeats)

    floor = timings["bare `rasterio.open().read()`"]
    log.info(
        "tile %d px (%s), rgb %d px, best of %d",
        args.tile,
        args.tiling,
        args.rgb_tile,
        args.repeats,
    )
    log.info("| method | scenes | seconds | scenes/s per core | ratio to bare read |")
    log.info("|---|---:|---:|---:|---:|")
    for name, seconds in timings.items():
        log.info(
            "| %s | %d | %.3f | %.0f | %.1f× |",
            name,
            len(scenes),
            seconds,
            len(scenes) / seconds,
            seconds / floor,
        )


if __name__ == "__main__":
    main()
