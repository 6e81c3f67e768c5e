"""What a teacher cache depends on: recorded in the cache when it is built, checked before use.

A cache of teacher targets is only valid for a training run that would have computed the same
targets online: the same store (``store_digest``), the same teacher (``teacher_identity``: its
weights file's digest, architecture and resolved layers) and global views drawn the same way
(``GlobalViews``: crop size and scale, aspect ratio, flips, photometric augmentation, and where
the teacher's RGB comes from). Training compares all three with the cache's record and refuses
a mismatch, naming each differing key, so a stale cache can never train silently.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from deo.config import to_dict
from deo.data.augment import N_GLOBAL, MultiCrop
from deo.data.store import open_store, read_store_table
from deo.errors import ConfigError, DataError
from deo.models.teacher import VFMTeacher
from deo.train.config import TrainConfig

FORMAT = 2
META_ATTR = "deo_teacher_cache"
"""Group attribute holding the cache's record (``cache_meta``)."""
COMPLETE_ATTR = "complete"
"""Group attribute set by ``finalise`` only: part groups and half-written caches lack it."""
CACHE_KEYS = ("mode", "views", "cache")
"""Keys of the config's ``teacher`` section that are about caching, not about the VFM itself."""


@dataclass(frozen=True)
class GlobalViews:
    """Every setting that fixes the global views (and so the teacher's input) of a run.

    ``rgb`` is where the optical channels come from: ``partner`` (the store's aerial ``rgb``
    where a sample has one, Sentinel-2's B04/B03/B02 elsewhere: ``train.ablation.hr_optical``)
    or ``derived`` (Sentinel-2's for every sample). The normalisation the VFM's input gets is
    the store's statistics, which the store digest covers, or the authors' constants
    (``normalisation``). Local-view settings are absent on purpose: local views stay freshly
    random in a cached run.
    """

    global_size: int
    global_scale: tuple[float, float]
    ratio: tuple[float, float]
    vflip_p: float
    blur_kernel: int
    optical_aug: bool
    rgb: Literal["partner", "derived"]
    interpolation: Literal["bicubic", "bilinear"]
    normalisation: Literal["data", "authors"] = "data"

    @classmethod
    def of(cls, multicrop: MultiCrop) -> GlobalViews:
        """The global-view settings of an actual ``MultiCrop`` (what training checks)."""
        return cls(
            global_size=multicrop.global_size,
            global_scale=tuple(multicrop.global_scale),
            ratio=tuple(multicrop.ratio),
            vflip_p=multicrop.vflip_p,
            blur_kernel=multicrop.blur_kernel,
            optical_aug=multicrop.optical_aug,
            rgb="partner" if multicrop.partners else "derived",
            interpolation=multicrop.interpolation,
            normalisation=multicrop.normalisation,  # type: ignore[arg-type]
        )

    @classmethod
    def from_train(cls, cfg: TrainConfig) -> GlobalViews:
        """The global-view settings a training run with ``cfg`` uses (what the workflow caches).

        Taken from the loop's own ``MultiCrop``, so the defaults that the config does not expose
        (ratio, flips, blur taps) come from one place.
        """
        return cls.of(MultiCrop.for_training(cfg))

    @property
    def with_rgb(self) -> bool:
        return self.rgb == "partner"

    def multicrop(self, band_stats: dict | None) -> MultiCrop:
        """A ``MultiCrop`` drawing and rendering exactly these global views (and no local one)."""
        return MultiCrop(
            global_size=self.global_size,
            n_local=0,
            global_scale=self.global_scale,
            ratio=self.ratio,
            vflip_p=self.vflip_p,
            blur_kernel=self.blur_kernel,
            optical_aug=self.optical_aug,
            partners=self.with_rgb,
            band_stats=band_stats,
            interpolation=self.interpolation,
            normalisation=self.normalisation,
        )


@dataclass(frozen=True)
class CacheConfig:
    """How a cache is built (``teacher.views`` and ``teacher.cache`` of the config).

    ``views`` (K) must be a multiple of the 2 global views: view ``k`` is drawn as DINO's global
    view ``k % 2`` (always blurred vs. sometimes solarized), and training fills global slot ``v``
    with one of the views of kind ``v``, so a cached run keeps the two views' distributions.
    """

    views: int = 4
    precision: Literal["fp16", "int8"] = "fp16"
    shards: int = 1
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.views < N_GLOBAL or self.views % N_GLOBAL:
            raise ConfigError(
                f"teacher.views must be a positive multiple of {N_GLOBAL} (one kind per global "
                f"view), got {self.views}"
            )
        if self.shards < 1 or self.batch_size < 1:
            raise ConfigError("teacher.cache.shards and teacher.cache.batch_size must be >= 1")


def split_teacher_section(section: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the VFM's own keys, the caching keys) of the config's ``teacher`` section.

    The VFM's keys are what ``TeacherConfig`` reads; keeping the caching keys out of them means
    that switching ``teacher.mode`` or K does not change the teacher's identity (nor the tiny
    teacher's weights file).
    """
    model = {k: v for k, v in section.items() if k not in CACHE_KEYS}
    return model, {k: section[k] for k in CACHE_KEYS if k in section}


def teacher_identity(vfm: VFMTeacher) -> dict[str, Any]:
    """What makes a teacher's outputs what they are: config (not the weights file's path),
    weights digest, and the resolved layer indices (so ``mid_layer: null`` equals its default)."""
    cfg = to_dict(vfm.cfg)
    del cfg["weights"]
    if not vfm.cfg.tiny:
        cfg = {k: v for k, v in cfg.items() if not k.startswith("tiny_") and k != "seed"}
    return {
        **cfg,
        "mid_layer": vfm.mid_layer,
        "final_layer": vfm.final_layer,
        "embed_dim": vfm.embed_dim,
        "weights_digest": vfm.weights_digest(),
    }


def store_digest(store: Path, table: Path) -> str:
    """A digest of a store's content, without reading its arrays.

    Covers the group's attributes (bands, tile size, provenance with the data config's digest,
    the per-band statistics that derived RGB depends on), the arrays' shapes, dtypes and shard
    sizes, and every cell of the per-sample table (keys and source checksums), which the merge
    rewrites together with the arrays.
    """
    group = open_store(store)
    frame = read_store_table(table, group)
    arrays = {
        name: [list(a.shape), str(a.dtype), list(a.shards or ())] for name, a in group.arrays()
    }
    header = {"attrs": dict(group.attrs), "arrays": arrays, "columns": list(frame.columns)}
    h = hashlib.sha256(json.dumps(header, sort_keys=True, default=str).encode())
    h.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return h.hexdigest()[:16]


def cache_meta(
    *,
    store: dict[str, Any],
    teacher: dict[str, Any],
    views: GlobalViews,
    cache: CacheConfig,
    grid: tuple[int, int],
) -> dict[str, Any]:
    """The record a cache carries: what it depends on, and what fixes its content.

    ``cache.shards`` and ``cache.batch_size`` are left out: they change how the work is split,
    not the result (a cache built by several jobs equals one built by one).
    """
    record = {
        "format": FORMAT,
        "store": store,
        "teacher": teacher,
        "views": to_dict(views),
        "k": cache.views,
        "precision": cache.precision,
        "seed": cache.seed,
        "grid": list(grid),
    }
    return json.loads(json.dumps(record))  # as it reads back from the group's attributes


def _differences(label: str, cached: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    return [
        f"{label}.{key}: cache {cached.get(key)!r}, this run {wanted.get(key)!r}"
        for key in sorted(cached.keys() | wanted.keys())
        if cached.get(key) != wanted.get(key)
    ]


def check_cache(
    path: Path, meta: dict[str, Any], *, store: str, teacher: dict[str, Any], views: GlobalViews
) -> None:
    """Refuse a cache built from another store, by another teacher or for other global views."""
    problems = []
    if meta["store"]["digest"] != store:
        problems.append(
            f"store digest: cache {meta['store']['digest']}, this run {store} (the store was "
            "rebuilt or another store is given)"
        )
    problems += _differences("teacher", meta["teacher"], json.loads(json.dumps(teacher)))
    problems += _differences("global views", meta["views"], to_dict(views))
    if problems:
        raise DataError(
            path,
            "this teacher cache does not match the run: "
            + "; ".join(problems)
            + ". Rebuild it (Snakemake reruns cache_teacher when these settings change) or "
            "train with teacher.mode: online",
        )
