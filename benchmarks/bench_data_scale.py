"""The data stage at scale: per-stage throughput, peak memory and the time for 500K scenes.

Runs the pipeline's own stage functions (``deo.data.stages``) on a file:// mirror of ``--scenes``
scenes with fMoW-like sizes: Sentinel scenes log-uniform in ``--s2-px`` (mostly small, a few
up to 600 px a side, as fMoW-Sentinel's crops around objects) and RGB partners of
``--rgb-px`` pixels a side. Rendering thousands of scenes with the synthetic ground model
would take longer than the stages themselves, so ``--distinct`` scenes are rendered and the
mirror repeats them under new location ids (new names, same bytes): each stage's cost per scene
depends on sizes and content, not on which location a file is named after.

Stages, each in a fresh process so its peak resident memory is its own:

- ``verify``: the archive against its manifest, re-hashing (``--rehash``) against the size and
  mtime check that ``deo verify`` now does by default;
- ``select``, ``extract`` (streamed from the .tar.gz), ``pair``;
- ``harmonise``: ``--shards`` shards on a pool of ``--workers`` processes (config/paper.yaml's
  harmonise settings, tile 224), peak memory per worker;
- ``merge``: the shard stores into the final store.

The last column extrapolates linearly to 500,000 scenes at the measured rate (harmonise on
``--workers`` cores; verify and extract, which read the whole archive, to its 77.5 GB). Real
fMoW-RGB partners are larger than these (up to ~16,000 px a side), so harmonise's rate with
partners is an upper bound; ``read_rgb`` decodes them reduced.

    python benchmarks/bench_data_scale.py               # ~3-4 minutes on 2 cores
    python benchmarks/bench_data_scale.py --scenes 4000 --distinct 192
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import logging
import multiprocessing as mp
import os
import resource
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from deo.config import DataConfig, MirrorConfig, from_dict
from deo.data import stages
from deo.data.fetch import Manifest, sha256_file, verify_manifest
from deo.data.mirror import write_mirror

ROOT = Path(__file__).resolve().parents[1]
TARGET = 500_000
ARCHIVE_GB = 77.5  # fMoW-Sentinel's archive: verify's cost scales with bytes, not scenes
log = logging.getLogger("bench_data_scale")


def paper_data(shards: int, tile: int, max_nodata: float | None) -> DataConfig:
    """config/paper.yaml's data section, scaled to this run (no bound on rejects)."""
    raw = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())["data"]
    raw["harmonise"] |= {"shards": shards, "tile_size": tile}
    if max_nodata is not None:
        raw["harmonise"]["max_nodata_fraction"] = max_nodata
    raw["selection"] = {"splits": ["train", "val", "test"], "max_samples": 10**9, "seed": 0}
    raw["max_reject_fraction"] = 1.0
    return from_dict(DataConfig, raw, "data")


def build_hosts(root: Path, cfg: DataConfig, args: argparse.Namespace) -> int:
    """Render ``--distinct`` scenes, then repeat them to ``--scenes``; returns the count."""
    base = root / "base"
    categories = ("airport", "crop_field", "lake_or_pond", "port")
    per_loc = 4
    mirror = MirrorConfig(
        seed=args.seed,
        categories=categories,
        locations_per_category=max(1, args.distinct // (len(categories) * per_loc)),
        images_per_location=per_loc - 1,
        ms_only_images_per_location=1,
        size_px=tuple(args.s2_px),
        size_dist="log_uniform",
        rgb_size_px=tuple(args.rgb_px),
        bad_inputs=False,
    )
    s = cfg.sentinel
    write_mirror(
        mirror,
        base,
        csvs=s.csvs,
        archive=s.archive,
        archive_prefix=s.archive_prefix,
        folders=s.folders,
        rgb_mappings={},
    )
    with tarfile.open(base / "sentinel" / s.archive) as tar:
        blobs = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isreg()}
    rows = {
        split: list(csv.DictReader((base / "sentinel" / name).read_text().splitlines()))
        for split, name in s.csvs.items()
    }
    distinct = sum(len(r) for r in rows.values())
    copies = -(-args.scenes // distinct)
    hosts = root / "hosts"
    (hosts / "sentinel").mkdir(parents=True)
    raw = io.BytesIO()
    total = 0
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for split, split_rows in rows.items():
            out_rows = []
            folder = s.folders.get(split, split)
            for copy in range(copies):
                for row in split_rows:
                    if total >= args.scenes:
                        break
                    cat, loc, image = row["category"], int(row["location_id"]), row["image_id"]
                    new = loc + copy * 1000
                    old_stem = f"{cat}/{cat}_{loc}/{cat}_{loc}_{image}"
                    new_stem = f"{cat}/{cat}_{new}/{cat}_{new}_{image}"
                    data = blobs.get(f"{s.archive_prefix}{folder}/{old_stem}.tif")
                    if data is None:
                        continue
                    info = tarfile.TarInfo(f"{s.archive_prefix}{folder}/{new_stem}.tif")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                    for ext in ("jpg", "json"):
                        src = base / "rgb" / split / f"{old_stem}_rgb.{ext}"
                        if src.exists():
                            dst = hosts / "rgb" / split / f"{new_stem}_rgb.{ext}"
                            dst.parent.mkdir(parents=True, exist_ok=True)
                            os.link(src, dst)
                    out_rows.append({**row, "location_id": new})
                    total += 1
            with open(hosts / "sentinel" / s.csvs[split], "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(split_rows[0]))
                writer.writeheader()
                writer.writerows(out_rows)
    (hosts / "sentinel" / s.archive).write_bytes(gzip.compress(raw.getvalue(), compresslevel=1))
    log.info("mirror: %d scenes from %d distinct", total, distinct)
    return total


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss would carry the parent's over
    the fork and exec of a spawned process)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _in_child(fn: Callable[..., Any], args: tuple, queue: mp.Queue) -> None:
    start = time.perf_counter()
    result = fn(*args)
    seconds = time.perf_counter() - start
    queue.put((seconds, peak_rss_mb(), result))


def measured(fn: Callable[..., Any], *args: Any) -> tuple[float, float, Any]:
    """(seconds, peak RSS MB, result) of ``fn(*args)`` in a fresh process."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_in_child, args=(fn, args, queue))
    proc.start()
    out = queue.get()
    proc.join()
    if proc.exitcode:
        raise RuntimeError(f"{fn.__name__} failed with exit code {proc.exitcode}")
    return out


def _shard(pairs: Path, shard: int, cfg: DataConfig, work: Path) -> float:
    stages.harmonise_shard(
        pairs,
        shard,
        cfg.harmonise.shards,
        cfg.harmonise,
        cfg.rgb.enabled,
        work / "shards" / f"{shard}.zarr",
        work / "rejects" / f"harmonise_{shard}.csv",
    )
    return peak_rss_mb()


def harmonise_all(pairs: Path, cfg: DataConfig, work: Path, workers: int) -> list[float]:
    """Every shard on a pool of ``workers`` processes; each worker's peak RSS (MB)."""
    (work / "rejects").mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_shard, pairs, i, cfg, work) for i in range(cfg.harmonise.shards)]
        return [f.result() for f in futures]


def verify(manifest: Path, rehash: bool) -> int:
    problems = verify_manifest(manifest, rehash=rehash)
    if problems:
        raise RuntimeError(problems)
    return 0


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    cfg = paper_data(args.shards, args.tile, args.max_nodata_fraction)
    s = cfg.sentinel
    work = Path(tempfile.mkdtemp(prefix="bench-data-scale-"))
    try:
        n = build_hosts(work, cfg, args)
        hosts, dl = work / "hosts", work / "downloads"
        shutil.copytree(hosts / "sentinel", dl / "sentinel")
        archive = dl / "sentinel" / s.archive
        book = Manifest(dl / "sentinel" / "manifest.json")
        book.record(archive, archive.stat().st_size, sha256_file(archive), "file:///bench")
        rows = []

        def row(stage: str, count: int, seconds: float, rss: float, scale: float = 0.0) -> None:
            """``scale``: the factor to 500K scenes when not scenes (the archive's bytes)."""
            rows.append(
                {
                    "stage": stage,
                    "items": count,
                    "seconds": seconds,
                    "items_per_s": count / seconds if seconds else float("inf"),
                    "peak_rss_mb": rss,
                    "hours_500k": seconds * (scale or TARGET / count) / 3600,
                }
            )

        mb = archive.stat().st_size / 1e6
        for rehash in (True, False):
            sec, rss, _ = measured(verify, book.path, rehash)
            name = f"verify ({'re-hash' if rehash else 'size+mtime'}, {mb:.0f} MB)"
            row(name, n, sec, rss, scale=ARCHIVE_GB * 1e3 / mb)
        sel = work / "selection.parquet"
        sec, rss, _ = measured(stages.select, dl / "sentinel", s, cfg.selection, sel)
        row("select", n, sec, rss)
        sec, rss, _ = measured(
            stages.extract,
            archive,
            sel,
            s.archive_prefix,
            dl / "scenes",
            work / "extracted.csv",
            work / "skipped.csv",
        )
        row("extract", n, sec, rss, scale=ARCHIVE_GB * 1e3 / mb)
        pairs = work / "pairs.parquet"
        sec, rss, _ = measured(
            stages.pair,
            sel,
            dl / "scenes",
            hosts / "rgb",
            None,
            work / "skipped.csv",
            s.archive_prefix,
            pairs,
            work / "pair_rejects.csv",
            work / "pair_counts.json",
        )
        row("pair", n, sec, rss)
        start = time.perf_counter()
        peaks = harmonise_all(pairs, cfg, work, args.workers)
        sec = time.perf_counter() - start
        row(f"harmonise ({args.workers} workers)", n, sec, max(peaks))
        shards = [work / "shards" / f"{i}.zarr" for i in range(cfg.harmonise.shards)]
        rejects = [work / "pair_rejects.csv"]
        rejects += [work / "rejects" / f"harmonise_{i}.csv" for i in range(cfg.harmonise.shards)]
        sec, rss, _ = measured(
            stages.merge,
            shards,
            rejects,
            pairs,
            cfg,
            work / "pretrain.zarr",
            work / "pretrain.parquet",
            work / "rejects.csv",
            work / "counts.json",
        )
        stored = len(pd.read_parquet(work / "pretrain.parquet", columns=["key"]))
        row("merge", stored, sec, rss)
        paired = int((pd.read_parquet(pairs)["pairing"] == "paired").sum())
        store_mb = sum(f.stat().st_size for f in (work / "pretrain.zarr").rglob("*")) / 1e6
        log.info(
            "%d scenes, %d with a partner, %d stored; store %.0f MB (%.1f GB at 500K)",
            n,
            paired,
            stored,
            store_mb,
            store_mb / stored * TARGET / 1e3,
        )
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=2000)
    parser.add_argument("--distinct", type=int, default=96, help="scenes rendered, then repeated")
    parser.add_argument("--s2-px", type=int, nargs=2, default=[10, 600])
    parser.add_argument("--rgb-px", type=int, nargs=2, default=[256, 1024])
    parser.add_argument("--tile", type=int, default=224)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-nodata-fraction",
        type=float,
        help="override paper.yaml's (1.0 keeps small scenes where tiling is fixed_gsd)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    logging.getLogger("deo").setLevel(logging.WARNING)
    rows = run(args)
    print(f"\n{'stage':<34}{'scenes':>7}{'s':>9}{'scenes/s':>12}{'peak MB':>9}{'h @500K':>9}")
    for r in rows:
        print(
            f"{r['stage']:<34}{r['items']:>7}{r['seconds']:>9.2f}{r['items_per_s']:>12.1f}"
            f"{r['peak_rss_mb']:>9.0f}{r['hours_500k']:>9.2f}"
        )


if __name__ == "__main__":
    main()
