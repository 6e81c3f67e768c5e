"""Training's side of the cache: per batch, two of each sample's K cached views and their targets.

Reads go through the store's ``ShardReader`` (the cache has the store's sharded layout), so a
batch costs one shard-index read and one ``pread`` per sample and array. A sample's K views are
read whole and two kept: the cost of reading ``K / 2`` times the targets a step uses, against a
second chunk layout and reader of its own.
"""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from torch import Tensor

from deo.cache.build import PARAMS, array_names
from deo.cache.codec import SCALE, TARGETS, decode
from deo.cache.spec import (
    COMPLETE_ATTR,
    FORMAT,
    META_ATTR,
    GlobalViews,
    check_cache,
    store_digest,
    teacher_identity,
)
from deo.data.augment import N_GLOBAL, ViewParams
from deo.data.store import ShardReader
from deo.errors import DataError
from deo.models.teacher import TeacherConfig, TeacherOutputs, VFMTeacher

log = logging.getLogger(__name__)


class CachedTargets:
    """A finished teacher cache, opened for reading.

    ``meta`` is the cache's record (``spec.cache_meta``); call ``verify`` before training on it.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            group = zarr.open_group(self.path, mode="r", zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
            raise DataError(self.path, "no teacher cache here; run the cache_teacher rule") from e
        meta = group.attrs.get(META_ATTR)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise DataError(self.path, f"not a teacher cache of format {FORMAT}")
        if group.attrs.get(COMPLETE_ATTR) is not True:
            raise DataError(self.path, "an unfinished teacher cache (a part, or not finalised)")
        self.meta: dict[str, Any] = meta
        self.k: int = meta["k"]
        self.grid: tuple[int, int] = tuple(meta["grid"])
        self._readers = {name: ShardReader(group[name]) for name in array_names(meta["precision"])}
        self._fields = [f.name for f in fields(ViewParams)]
        log.info(
            "teacher cache %s: %d samples x %d views, %s, grid %s",
            self.path,
            meta["store"]["n"],
            self.k,
            meta["precision"],
            self.grid,
        )

    def verify(self, *, store: str, teacher: dict[str, Any], views: GlobalViews) -> None:
        """Refuse the cache unless built from this store, by this teacher, for these views."""
        check_cache(self.path, self.meta, store=store, teacher=teacher, views=views)

    def verify_run(
        self, teacher_cfg: TeacherConfig, store: Path, table: Path, views: GlobalViews
    ) -> int:
        """``verify`` against a training run's inputs; returns the teacher's width ``D``.

        The teacher is built on the CPU only to identify it (weights digest, resolved layers)
        and then dropped: a cached run never runs it, so it takes no accelerator memory.
        """
        vfm = VFMTeacher(teacher_cfg)
        self.verify(store=store_digest(store, table), teacher=teacher_identity(vfm), views=views)
        return vfm.embed_dim

    def read(
        self, rows: np.ndarray, views: np.ndarray, device: torch.device | str = "cpu"
    ) -> tuple[ViewParams, TeacherOutputs]:
        """View ``views[i]`` of store row ``rows[i]``: its parameters and float32 targets."""
        return self._select(self._read(rows), views, device)

    def draw(
        self, rows: Tensor, generator: torch.Generator, device: torch.device | str = "cpu"
    ) -> tuple[list[ViewParams], list[TeacherOutputs]]:
        """Two of each sample's K views, for global slots 0 and 1, and their targets.

        Slot ``v`` gets one of the views drawn as DINO's global view ``v`` (``k % 2 == v``),
        chosen uniformly with the training generator (so a resumed run draws the same).
        """
        choice = torch.randint(self.k // N_GLOBAL, (len(rows), N_GLOBAL), generator=generator)
        views = (choice * N_GLOBAL + torch.arange(N_GLOBAL)).numpy()
        data = self._read(rows.cpu().numpy())
        selected = [self._select(data, views[:, slot], device) for slot in range(N_GLOBAL)]
        return [params for params, _ in selected], [targets for _, targets in selected]

    def _read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Every array's K views of ``rows``, by array path."""
        return {name: reader.read(rows) for name, reader in self._readers.items()}

    def _select(
        self, data: dict[str, np.ndarray], views: np.ndarray, device: torch.device | str
    ) -> tuple[ViewParams, TeacherOutputs]:
        pick = (np.arange(len(views)), views)
        params = ViewParams.from_dict(
            {f: torch.from_numpy(data[f"{PARAMS}/{f}"][pick]) for f in self._fields}
        )
        targets = {
            name: decode({s: data[name + s][pick] for s in ("", SCALE) if name + s in data})
            for name in TARGETS
        }
        outputs = TeacherOutputs(
            **{name: t.to(device, non_blocking=True) for name, t in targets.items()},
            grid=self.grid,
        )
        return params, outputs
