"""The data stages as functions over paths: what each ``deo <stage>`` command does.

Large inputs (the archive, extracted scenes, RGB partners) live in a persistent download area
that Snakemake never deletes, so interrupted or repeated stages resume instead of starting
over; each stage's declared output is its record (a table of what it did).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from deo import __version__
from deo.config import DataConfig, HarmoniseConfig, SelectionConfig, SentinelSource, digest, to_dict
from deo.data import fmow
from deo.data.coreg import check_partner
from deo.data.extract import extract_tar, write_skipped_csv
from deo.data.fetch import FetchItem, FetchResult, fetch_all, require_ok
from deo.data.harmonise import read_rgb, read_s2
from deo.data.pair import pair_scenes
from deo.data.rejects import Reject, check_reject_fraction, read_rejects, write_rejects
from deo.data.store import ShardWriter, merge_shards, read_json, write_json_atomic
from deo.errors import DataError

log = logging.getLogger(__name__)

FETCH_RECORD_COLUMNS = ("url", "dest", "ok", "error", "size", "sha256", "skipped")


def write_fetch_record(results: Sequence[FetchResult], path: Path) -> None:
    rows = [
        (r.item.url, str(r.item.dest), r.ok, r.error or "", r.size, r.sha256, r.skipped)
        for r in results
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=FETCH_RECORD_COLUMNS).to_csv(path, index=False)


def fetch_files(
    base_url: str, names: Sequence[str], dest_dir: Path, record: Path, *, cfg: DataConfig
) -> None:
    """Fetch named files below ``base_url`` into ``dest_dir``; any failure is fatal."""
    items = [FetchItem(base_url + name, dest_dir / name) for name in names]
    results = _fetch(items, dest_dir, cfg)
    write_fetch_record(results, record)
    require_ok(results)


def fetch_partners(
    selection: Path, base_url: str, dest_dir: Path, record: Path, *, cfg: DataConfig
) -> None:
    """Fetch the fMoW-RGB partners of the selected scenes; a failed file is recorded, not fatal.

    A split's mapping file (``data.rgb.mappings``, fMoW's ``test_gt_mapping.json``) is fetched
    first, and a failure to get it is fatal: without it that split's partners cannot be named.
    """
    scenes = pd.read_parquet(selection)
    maps = [FetchItem(base_url + name, dest_dir / name) for name in cfg.rgb.mappings.values()]
    map_results = _fetch(maps, dest_dir, cfg)
    require_ok(map_results)
    layout = fmow.RgbLayout.load(dest_dir, cfg.rgb.mappings)
    wanted = (
        layout.relpaths(s.split, s.category, s.location_id, s.image_id)
        for s in scenes[scenes["has_partner"]].itertuples()
    )
    items = [FetchItem(base_url + rel, dest_dir / rel) for rels in wanted if rels for rel in rels]
    results = map_results + _fetch(items, dest_dir, cfg)
    write_fetch_record(results, record)
    failed = [r for r in results if not r.ok]
    log.info("fetched %d partner files, %d failed", len(results) - len(failed), len(failed))


def _fetch(items: list[FetchItem], dest_dir: Path, cfg: DataConfig) -> list[FetchResult]:
    f = cfg.fetch
    return fetch_all(
        items,
        dest_dir / "manifest.json",
        workers=f.workers,
        retries=f.retries,
        backoff=f.backoff_s,
        timeout=f.timeout_s,
        refresh=f.refresh,
    )


def select(csv_dir: Path, sentinel: SentinelSource, selection: SelectionConfig, out: Path) -> None:
    """Read the split CSVs and write the seeded selection of scenes."""
    unknown = sorted(set(selection.splits) - set(sentinel.csvs))
    if unknown:
        raise DataError(csv_dir, f"selection.splits {unknown} have no CSV in data.sentinel.csvs")
    scenes = pd.concat(
        [fmow.read_scene_csv(csv_dir / sentinel.csvs[s], s) for s in selection.splits],
        ignore_index=True,
    )
    chosen = fmow.select_scenes(scenes, selection.max_samples, selection.seed, sentinel.folders)
    out.parent.mkdir(parents=True, exist_ok=True)
    chosen.to_parquet(out, index=False)
    log.info("selected %d of %d scenes from %s", len(chosen), len(scenes), list(selection.splits))


def extract(
    archive: Path, selection: Path, prefix: str, dest: Path, record: Path, skipped: Path
) -> None:
    """Extract only the selected scenes from the (streamed) archive."""
    wanted = {prefix + p for p in pd.read_parquet(selection)["s2_relpath"]}
    report = extract_tar(
        archive,
        dest,
        wanted=wanted.__contains__,
        strip_components=prefix.count("/"),
        expect_prefix=prefix,
    )
    write_skipped_csv(report, skipped)
    record.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"member": report.extracted}).to_csv(record, index=False)


def pair(
    selection: Path,
    sentinel_root: Path,
    rgb_root: Path | None,
    rgb_record: Path | None,
    extract_skipped: Path,
    prefix: str,
    out: Path,
    rejects: Path,
    counts: Path,
    rgb_mappings: dict[str, str] | None = None,
) -> None:
    failures = {
        str(sentinel_root / member.removeprefix(prefix)): f"refused by extract: {reason}"
        for member, reason in pd.read_csv(extract_skipped, keep_default_na=False).itertuples(
            index=False
        )
    }
    if rgb_record is not None:
        fetched = pd.read_csv(rgb_record, keep_default_na=False)
        failed = fetched[~fetched["ok"].astype(bool)]
        failures |= {
            str(Path(dest)): f"partner download failed: {error}"
            for dest, error in zip(failed["dest"], failed["error"], strict=True)
        }
    layout = fmow.RgbLayout.load(rgb_root, rgb_mappings or {}) if rgb_root is not None else None
    result = pair_scenes(pd.read_parquet(selection), sentinel_root, rgb_root, failures, layout)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.pairs.to_parquet(out, index=False)
    write_rejects(result.rejects, rejects)
    counts.write_text(json.dumps(result.counts, indent=2, sort_keys=True))
    log.info("pairing: %s", result.counts)


def harmonise_shard(
    pairs: Path,
    shard: int,
    n_shards: int,
    cfg: HarmoniseConfig,
    with_rgb: bool,
    out: Path,
    rejects: Path,
) -> None:
    """Harmonise every ``n_shards``-th scene starting at ``shard`` into a shard store.

    A partner that fails the co-registration check (``deo.data.coreg``) is recorded in
    ``rejects`` with its score and the scene is kept MS-only (``has_rgb`` false, blank ``rgb``):
    the Sentinel scene itself is fine, and training builds its optical channels from B04/B03/B02.

    Work goes to ``<out>.partial`` (not a Snakemake output, so it survives a failed or killed
    job); a rerun skips the scenes already written and renames the shard into place at the end.
    The partial shard is keyed by the digest of everything that decides its samples (this
    job's settings and inputs), so a rerun under other settings starts it over, and it holds
    the rejects found so far, so a resumed job ends with the rejects of an uninterrupted one.
    """
    table = pd.read_parquet(pairs)
    mine = table.iloc[shard::n_shards]
    partial = out.with_name(out.name + ".partial")
    settings = {
        "harmonise": to_dict(cfg),
        "with_rgb": with_rgb,
        "inputs": json.loads(mine.to_json(orient="records")),
        "deo_version": __version__,
    }
    # The writer flushes its table on the way out, also when the job fails or is terminated.
    with ShardWriter(
        partial,
        n=len(mine),
        tile_size=cfg.tile_size,
        with_rgb=with_rgb,
        rgb_tile_size=cfg.rgb_tile_size,
        settings=settings,
    ) as writer:
        done = writer.done_keys
        if done:
            log.info("resuming shard %d: %d of %d scenes done", shard, len(done), len(mine))
        found = ShardRejects(partial, done)
        _harmonise_scenes(mine, done, writer, cfg, with_rgb, found)
        stored = len(writer.done_keys)
    kept = found.ordered()
    write_rejects(kept, rejects)
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    log.info("shard %d: %d scenes stored, %d rejects", shard, stored, len(kept))


class ShardRejects:
    """The rejects of a harmonise job, kept in its partial shard (``rejects.json``).

    Each reject is saved (atomically) before the sample it belongs to is written, so a sample
    the shard lists always has its rejects on disk. On resume only the rejects of listed
    samples are kept; the other scenes are harmonised again and find theirs again.
    """

    FILE = "rejects.json"

    def __init__(self, partial: Path, done: set[str]) -> None:
        self.path = Path(partial) / self.FILE
        saved = read_json(self.path) if done else None
        self._rows: list[dict] = [r for r in saved or [] if r["key"] in done]
        if self._rows:
            log.info("resuming with %d rejects found before the interruption", len(self._rows))

    def add(self, position: int, key: str, reject: Reject) -> None:
        self._rows.append({"position": position, "key": key, **asdict(reject)})
        write_json_atomic(self._rows, self.path)

    def ordered(self) -> list[Reject]:
        """The rejects in the order of the job's inputs, as an uninterrupted run finds them."""
        rows = sorted(self._rows, key=lambda r: r["position"])
        return [Reject(r["path"], r["stage"], r["reason"]) for r in rows]


def _harmonise_scenes(
    mine: pd.DataFrame,
    done: set[str],
    writer: ShardWriter,
    cfg: HarmoniseConfig,
    with_rgb: bool,
    found: ShardRejects,
) -> None:
    for position, scene in enumerate(mine.itertuples(index=False)):
        if scene.s2_relpath in done:
            continue
        try:
            s2, grid, s2_info = read_s2(Path(scene.s2_path), cfg)
        except DataError as e:
            found.add(position, scene.s2_relpath, Reject(e.path, "harmonise", e.problem))
            continue
        rgb, rgb_info, score = None, {}, math.nan
        if with_rgb and isinstance(scene.rgb_jpg, str):  # absent partners read back as NaN
            try:
                rgb, rgb_info = read_rgb(
                    Path(scene.rgb_jpg), Path(scene.rgb_json), grid, cfg, polygon_wkt=scene.polygon
                )
            except DataError as e:
                found.add(position, scene.s2_relpath, Reject(e.path, "harmonise", e.problem))
        if rgb is not None:
            score, reject = check_partner(s2, grid, rgb, rgb_info, cfg, scene.rgb_jpg)
            if reject is not None:
                found.add(position, scene.s2_relpath, reject)
                rgb = None
        has_rgb = rgb is not None
        if with_rgb and rgb is None:
            rgb = _blank_rgb(cfg.rgb_tile_size)
        meta = _sample_meta(scene, rgb_info, s2_info, has_rgb=has_rgb)
        writer.write(position, s2, rgb, meta | grid.footprint() | {"coreg_score": score})


def _blank_rgb(size: int) -> np.ndarray:
    """All-zero RGB for scenes without a usable partner (``has_rgb`` is false in the table)."""
    return np.zeros((3, size, size), dtype=np.uint8)


def _sample_meta(scene, rgb_info: dict, s2_info: dict, *, has_rgb: bool) -> dict:
    return {
        "key": scene.s2_relpath,
        "order": int(scene.order),
        "split": scene.split,
        "category": scene.category,
        "location_id": int(scene.location_id),
        "image_id": int(scene.image_id),
        "timestamp": scene.timestamp,
        "polygon": scene.polygon,
        "pairing": scene.pairing,
        "has_rgb": has_rgb,
        "s2_path": scene.s2_path,
        "s2_sha256": sha256_file(Path(scene.s2_path)),
        "rgb_path": scene.rgb_jpg if has_rgb else None,
        "rgb_sha256": sha256_file(Path(scene.rgb_jpg)) if has_rgb else None,
        "harmonise_info": json.dumps({**s2_info, **rgb_info}, sort_keys=True, default=str),
    }


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def merge(
    shards: Sequence[Path],
    reject_tables: Sequence[Path],
    pairs: Path,
    cfg: DataConfig,
    out_store: Path,
    out_table: Path,
    out_rejects: Path,
    out_counts: Path,
) -> None:
    """Assemble the final store and the full rejects table; enforce the reject bound."""
    rejects = [r for t in reject_tables for r in read_rejects(t)]
    write_rejects(rejects, out_rejects)
    selected = pd.read_parquet(pairs)
    n_partners = int(
        selected["rgb_jpg"].notna().sum() + (selected["pairing"] == "partner_missing").sum()
    )
    partner_rejects = [r for r in rejects if fmow.is_rgb_path(r.path)]
    scene_rejects = [r for r in rejects if not fmow.is_rgb_path(r.path)]
    n_scenes = len(selected) + sum(r.stage == "pair" for r in scene_rejects)
    check_reject_fraction(scene_rejects, n_scenes, cfg.max_reject_fraction, out_rejects)
    if n_partners:
        check_reject_fraction(partner_rejects, n_partners, cfg.max_reject_fraction, out_rejects)
    n = merge_shards(
        shards,
        out_store,
        out_table,
        samples_per_shard=cfg.store.samples_per_shard,
        clevel=cfg.store.clevel,
        attrs=store_attrs(cfg),
        gsd_m=cfg.harmonise.gsd_m,
        shuffle_seed=cfg.store.shuffle_seed,
        threads=cfg.store.merge_threads,
    )
    counts = {
        "scenes_selected": n_scenes,
        "scenes_stored": n,
        "partners_expected": n_partners,
        "partners_stored": int(pd.read_parquet(out_table, columns=["has_rgb"])["has_rgb"].sum()),
        "rejects_by_stage": dict(Counter(r.stage for r in rejects)),
        "rejects_by_reason": dict(Counter(_reason_kind(r.reason) for r in rejects)),
    }
    out_counts.write_text(json.dumps(counts, indent=2, sort_keys=True))
    log.info("store %s: %d samples; %d rejects", out_store, n, len(rejects))


def _reason_kind(reason: str) -> str:
    """The reason without its per-file details (after the first colon), for counting."""
    return reason.split(":", 1)[0]


def store_attrs(cfg: DataConfig) -> dict:
    """Provenance for the store's attributes (``merge_shards`` adds the band metadata)."""
    return {
        "provenance": {
            "sentinel_url": cfg.sentinel.url if cfg.mirror is None else "synthetic mirror",
            "rgb_url": (cfg.rgb.url if cfg.mirror is None else "synthetic mirror")
            if cfg.rgb.enabled
            else None,
            "config_digest": digest(to_dict(cfg)),
            "deo_version": __version__,
        },
    }
