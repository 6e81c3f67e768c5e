"""Building a teacher cache: parts computed by parallel jobs, then assembled without a copy.

Layout (DESIGN.md, "Teacher cache"): one Zarr v3 group with, for every store row ``n`` and cached
view ``k`` (``K`` = ``teacher.views``), the view's parameters ``params/<field>`` ``(N, K, ...)``
(``ViewParams`` fields) and the teacher's outputs ``cls`` ``(N, K, D)``, ``patch_final`` and
``patch_mid`` ``(N, K, P, D)``, fp16 or int8 with ``<name>_scale`` per token (``codec``). Chunks
of one sample in shards of the store's ``samples_per_shard`` samples: the layout of the store,
read by the same ``ShardReader``, and a training batch (drawn shard by shard) hits one or two
shard files.

Work is split in *blocks*, one per store shard. Job ``j`` of ``teacher.cache.shards`` owns a
contiguous range of blocks and writes them into its own part group (full-size arrays of which it
fills only its blocks' shard files), under a work directory outside Snakemake's outputs so that
an interrupted job resumes: a block is written whole, then listed in the part's progress file.
A block's views come from a generator seeded by (seed, block) alone, and its teacher batches do
not depend on the job either, so the result does not depend on how many jobs built it.
``finalise`` then hard-links every part's shard files into the final group (a copy only across
file systems), marks it complete, and removes the parts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from torch.utils.data import default_collate
from zarr.codecs import BloscCodec

from deo.cache.codec import TARGETS, encode, stored_dtypes
from deo.cache.spec import (
    COMPLETE_ATTR,
    META_ATTR,
    CacheConfig,
    GlobalViews,
    cache_meta,
    store_digest,
    teacher_identity,
)
from deo.config import digest
from deo.data.augment import N_GLOBAL, MultiCrop, ViewParams
from deo.data.loader import PretrainDataset
from deo.data.stats import read_stats
from deo.data.store import open_store
from deo.errors import DataError
from deo.models.teacher import TeacherConfig, VFMTeacher

log = logging.getLogger(__name__)

PARAMS = "params"
"""Subgroup of the view parameters, one array per ``ViewParams`` field."""
# Features barely compress (fp16 ViT-B targets: zstd + bitshuffle saves 6% at 2.8x the read time
# of lz4, benchmarks/bench_teacher_cache.py), and training reads them every step: light lz4.
_CODEC = BloscCodec(cname="lz4", clevel=1, shuffle="shuffle")


def part_blocks(n_blocks: int, parts: int, part: int) -> list[int]:
    """The blocks (store shards) job ``part`` of ``parts`` computes: contiguous, near-equal."""
    return np.array_split(np.arange(n_blocks), parts)[part].tolist()


def block_generator(seed: int, block: int) -> torch.Generator:
    """The random stream of one block's views, the same whichever job draws it."""
    blob = hashlib.sha256(f"deo-teacher-cache:{seed}:{block}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(blob[:8], "little") >> 1)


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _sample_shapes(
    multicrop: MultiCrop, tile: int, k: int, grid: tuple[int, int], dim: int, precision: str
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Array path -> (per-sample shape, dtype) of everything a cache stores."""
    record = multicrop.sample_global(1, tile, 0, torch.Generator()).to_dict()
    shapes = {
        f"{PARAMS}/{name}": ((k, *value.shape[1:]), value.numpy().dtype)
        for name, value in record.items()
    }
    tokens = {
        "cls": (k,),
        "patch_final": (k, grid[0] * grid[1]),
        "patch_mid": (k, grid[0] * grid[1]),
    }
    for name in TARGETS:
        for suffix, dtype in stored_dtypes(precision).items():
            lead = tokens[name]
            shapes[name + suffix] = ((*lead, dim) if suffix == "" else lead, dtype)
    return shapes


def _create_part(
    path: Path, meta: dict[str, Any], shapes: dict[str, tuple[tuple[int, ...], np.dtype]]
) -> zarr.Group:
    n, per_shard = meta["store"]["n"], meta["store"]["samples_per_shard"]
    group = zarr.open_group(path, mode="w", zarr_format=3)
    group.create_group(PARAMS)
    for name, (shape, dtype) in shapes.items():
        group.create_array(
            name,
            shape=(n, *shape),
            dtype=dtype,
            chunks=(1, *shape),
            shards=(per_shard, *shape),
            compressors=_CODEC,
            fill_value=False if dtype == np.bool_ else 0,
        )
    group.attrs[META_ATTR] = meta
    return group


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _read_progress(path: Path) -> dict[str, Any] | None:
    """A part's progress record, or None when it is absent or unreadable."""
    state = _read_json(path)
    ok = isinstance(state, dict) and {"meta_digest", "blocks"} <= set(state)
    return state if ok else None


class _Part:
    """One job's part group and its progress file (the blocks already written)."""

    def __init__(self, work: Path, part: int, meta: dict[str, Any], shapes: dict) -> None:
        self.path = work / f"part-{part}.zarr"
        self.progress = work / f"part-{part}.json"
        self.meta_digest = digest(meta)
        self.done: set[int] = set()
        state = _read_progress(self.progress) if self.path.exists() else None
        if state is not None and state["meta_digest"] == self.meta_digest:
            self.group = zarr.open_group(self.path, mode="r+", zarr_format=3)
            self.done = set(state["blocks"])
            log.info("resuming %s: %d block(s) already done", self.path, len(self.done))
            return
        if self.path.exists() or self.progress.exists():
            why = "it was built for other settings" if state else "it has no readable progress"
            log.warning("starting %s over: %s", self.path, why)
        # The progress file goes first and comes back last: one that matches this job's
        # settings always describes a part group that was created in full.
        self.progress.unlink(missing_ok=True)
        if self.path.exists():
            shutil.rmtree(self.path)
        work.mkdir(parents=True, exist_ok=True)
        self.group = _create_part(self.path, meta, shapes)
        self._save()

    def _save(self) -> None:
        _write_json(self.progress, {"meta_digest": self.meta_digest, "blocks": sorted(self.done)})

    def write(self, block: int, start: int, arrays: dict[str, np.ndarray]) -> None:
        """Write a whole block (one shard file per array), then record it as done."""
        for name, value in arrays.items():
            self.group[name][start : start + len(value)] = value
        self.done.add(block)
        self._save()


def build_part(
    store: Path,
    table: Path,
    teacher_cfg: TeacherConfig,
    views: GlobalViews,
    cache: CacheConfig,
    part: int,
    work: Path,
    out: Path,
    *,
    device: str = "auto",
) -> None:
    """Compute part ``part`` of ``cache.shards`` into ``work`` (resuming) and write its record
    ``out``, which ``finalise`` reads."""
    if not 0 <= part < cache.shards:
        raise ValueError(f"part {part} is outside 0..{cache.shards - 1}")
    dev = _device(device)
    group = open_store(store)
    s2 = group["s2"]
    n, per_shard, tile = s2.shape[0], s2.shards[0], s2.shape[-1]
    blocks = part_blocks(math.ceil(n / per_shard), cache.shards, part)
    vfm = VFMTeacher(teacher_cfg).to(dev)
    multicrop = views.multicrop(read_stats(group))
    grid = (views.global_size // vfm.patch_size[0], views.global_size // vfm.patch_size[1])
    store_info = {
        "digest": store_digest(store, table),
        "n": n,
        "samples_per_shard": per_shard,
        "tile_size": tile,
    }
    meta = cache_meta(
        store=store_info, teacher=teacher_identity(vfm), views=views, cache=cache, grid=grid
    )
    shapes = _sample_shapes(multicrop, tile, cache.views, grid, vfm.embed_dim, cache.precision)
    target = _Part(Path(work), part, meta, shapes)
    dataset = PretrainDataset(store, table, with_rgb=views.with_rgb)
    todo = [b for b in blocks if b not in target.done]
    log.info(
        "part %d of %d: blocks %s, %d to compute on %s", part, cache.shards, blocks, len(todo), dev
    )
    for i, block in enumerate(todo):
        start = block * per_shard
        rows = np.arange(start, min(n, start + per_shard))
        arrays = compute_block(
            dataset, rows, multicrop, vfm, cache, tile, block_generator(cache.seed, block), dev
        )
        target.write(block, start, arrays)
        log.info(
            "block %d (rows %d-%d) written: %d of %d", block, rows[0], rows[-1], i + 1, len(todo)
        )
    record = {
        "part": part,
        "blocks": blocks,
        "group": str(target.path.resolve()),
        "meta_digest": target.meta_digest,
    }
    _write_json(Path(out), record)


def compute_block(
    dataset: PretrainDataset,
    rows: np.ndarray,
    multicrop: MultiCrop,
    vfm: VFMTeacher,
    cache: CacheConfig,
    tile: int,
    generator: torch.Generator,
    device: torch.device,
) -> dict[str, np.ndarray]:
    """Parameters and encoded targets of the K views of ``rows``, by array path.

    All K records are drawn first, for the whole block, then rendered and passed through the
    teacher ``cache.batch_size`` samples at a time (rendering is per-sample exact, so chunking
    changes no pixel). View ``k`` is drawn as DINO's global view ``k % 2``.
    """
    params = [
        multicrop.sample_global(len(rows), tile, k % N_GLOBAL, generator)
        for k in range(cache.views)
    ]
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in TARGETS}
    for start in range(0, len(rows), cache.batch_size):
        chunk = slice(start, start + cache.batch_size)
        batch = default_collate(dataset.__getitems__(rows[chunk].tolist()))
        ms = batch["s2"].to(device)
        rgb = batch["rgb"].to(device) if dataset.with_rgb else None
        has_rgb = batch.get("has_rgb")
        per_view = []
        for record in params:
            view = multicrop.apply(ms, rgb, has_rgb, record.index(chunk), multicrop.global_size)
            per_view.append(vfm(view[:, :3], normalised=True))
        for name in TARGETS:
            outputs[name].append(torch.stack([getattr(o, name) for o in per_view], dim=1).cpu())
    arrays: dict[str, np.ndarray] = {}
    for name in TARGETS:
        values = torch.cat(outputs[name])
        if not torch.isfinite(values).all():
            raise DataError(
                dataset.store, f"teacher output {name} is not finite for rows {rows[0]}-{rows[-1]}"
            )
        for suffix, value in encode(values, cache.precision).items():
            arrays[name + suffix] = value
    stacked = {
        name: torch.stack([p.to_dict()[name] for p in params], dim=1)
        for name in params[0].to_dict()
    }
    arrays |= {f"{PARAMS}/{name}": value.numpy() for name, value in stacked.items()}
    return arrays


def array_names(precision: str) -> list[str]:
    """The path of every array a cache holds (``params/box``, ..., ``cls``, ``cls_scale``, ...).

    Named from the format rather than listed from the group: Snakemake keeps a timestamp file
    inside directory outputs, which zarr warns about when it lists a group's members.
    """
    params = [f"{PARAMS}/{f.name}" for f in fields(ViewParams)]
    return params + [name + suffix for name in TARGETS for suffix in stored_dtypes(precision)]


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not supported: copy instead
        shutil.copy2(src, dst)


def finalise(records: Sequence[Path], out: Path) -> None:
    """Assemble the parts named by ``records`` into the cache ``out``, then remove the parts.

    Checks that the parts were built with one record (same store, teacher, views, K) and
    together hold every block exactly once, each listed as written in its progress file.
    The parts are removed only once ``<out>.tmp`` holds (hard links to) all of them and
    ``<out>.tmp.json`` says which parts it holds, so a killed run resumes from one or the other.
    """
    out = Path(out)
    parts = [json.loads(Path(r).read_text()) for r in records]
    if not parts:
        raise ValueError("no parts to assemble")
    tmp = out.with_name(out.name + ".tmp")
    marker = tmp.with_name(tmp.name + ".json")
    sources = [[rec["group"], rec["meta_digest"]] for rec in parts]
    if tmp.exists() and _read_json(marker) == {"parts": sources}:
        log.info("finishing the assembly of %s that an interrupted run completed", tmp)
    else:
        _assemble(records, parts, tmp)
        zarr.open_group(tmp, mode="r+", zarr_format=3).attrs[COMPLETE_ATTR] = True
        _write_json(marker, {"parts": sources})
    for rec in parts:
        path = Path(rec["group"])
        path.with_suffix(".json").unlink(missing_ok=True)
        if path.exists():
            shutil.rmtree(path)
        if path.parent.exists() and not any(path.parent.iterdir()):
            path.parent.rmdir()
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    marker.unlink()
    meta = zarr.open_group(out, mode="r", zarr_format=3).attrs[META_ATTR]
    log.info(
        "assembled %s from %d part(s): %d samples x %d views",
        out,
        len(parts),
        meta["store"]["n"],
        meta["k"],
    )


def _read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it is absent or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _assemble(records: Sequence[Path], parts: list[dict[str, Any]], tmp: Path) -> None:
    """Check the parts and hard-link their shard files into ``tmp`` (not yet marked complete)."""
    groups = []
    for record, rec in zip(records, parts, strict=True):
        path, progress = Path(rec["group"]), Path(rec["group"]).with_suffix(".json")
        state = _read_progress(progress)
        if state is None or not path.exists():
            problem = "its group or progress file is missing (an interrupted assembly?)"
        elif state["meta_digest"] != rec["meta_digest"] or not set(rec["blocks"]) <= set(
            state["blocks"]
        ):
            problem = "it is incomplete or from other settings"
        else:
            groups.append(zarr.open_group(path, mode="r", zarr_format=3))
            continue
        # Nothing reruns the part's job while its record exists: remove the record, so the
        # next run recomputes the part instead of failing here again.
        Path(record).unlink(missing_ok=True)
        raise DataError(
            path, f"{problem}; removed its record {record}: run the workflow again to recompute it"
        )
    meta = groups[0].attrs[META_ATTR]
    if odd := [
        p["group"] for p, g in zip(parts, groups, strict=True) if g.attrs[META_ATTR] != meta
    ]:
        raise DataError(tmp, f"parts {odd} were built with other settings than {parts[0]['group']}")
    n_blocks = math.ceil(meta["store"]["n"] / meta["store"]["samples_per_shard"])
    claimed = sorted(b for p in parts for b in p["blocks"])
    if claimed != list(range(n_blocks)):
        raise DataError(
            tmp, f"the parts hold blocks {claimed}, need each of 0..{n_blocks - 1} once"
        )

    if tmp.exists():
        shutil.rmtree(tmp)
    first = Path(parts[0]["group"])
    for meta_file in first.rglob("zarr.json"):
        target = tmp / meta_file.relative_to(first)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(meta_file, target)
    arrays = {name: groups[0][name] for name in array_names(meta["precision"])}
    for rec in parts:
        for block in rec["blocks"]:
            for name, array in arrays.items():
                key = array.metadata.chunk_key_encoding.encode_chunk_key(
                    (block,) + (0,) * (array.ndim - 1)
                )
                src = Path(rec["group"]) / name / key
                if src.exists():  # an all-fill shard (e.g. every vflip false) is never written
                    _link(src, tmp / name / key)
