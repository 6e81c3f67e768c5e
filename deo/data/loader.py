"""Training-time access to the pre-training store: a map-style dataset and a shard-aware sampler.

Throughput comes from reading the store the way it is laid out: a batch's samples are drawn from
one or two Zarr shards (``ShardGroupedSampler``) and fetched together
(``PretrainDataset.__getitems__``, which ``DataLoader`` calls instead of per-item reads), so a
batch costs one open and index read per shard plus one ``pread`` per sample.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from deo.data.bands import MS_BANDS
from deo.data.store import ShardReader, open_store, read_store_table, store_bands
from deo.errors import DataError

log = logging.getLogger(__name__)


class PretrainDataset(Dataset):
    """Samples of the pre-training store (optionally one split), raw as stored.

    Items are ``{"s2": uint16 (10, T, T) Sentinel-2 DN, "index": int64 store row}`` and, with
    ``with_rgb``, ``"rgb": uint8 (3, R, R)`` (the aerial partner, zeros without one) and
    ``"has_rgb": bool`` (the table's flag). Normalisation happens after the views are cut
    (``deo.data.augment.MultiCrop``): the optical channels are scaled per crop first, so the
    loader cannot normalise, and raw integers are also the cheapest to move to the device.

    Reads go through ``ShardReader``: one call per array per batch, which opens the shard files
    it needs itself. The dataset therefore holds no Zarr object (whose asyncio loop thread does
    not survive a fork) and no open file, so DataLoader workers can fork or pickle it as is.
    """

    def __init__(
        self,
        store: Path,
        table: Path | None = None,
        split: str | None = None,
        with_rgb: bool = False,
    ) -> None:
        self.store = Path(store)
        self.with_rgb = with_rgb
        group = open_store(self.store)
        if with_rgb and "rgb" not in group.array_keys():
            raise DataError(self.store, "with_rgb=True, but the store was built without 'rgb'")
        if store_bands(group) != MS_BANDS:
            raise DataError(self.store, f"bands {store_bands(group)}, expected {MS_BANDS}")
        n = group["s2"].shape[0]
        frame = None
        if table is not None:
            frame = read_store_table(table, group)
        elif split is not None or with_rgb:
            raise ValueError(
                "split=... and with_rgb=True need the store's sample table (table=...)"
            )
        if split is None:
            self.rows = np.arange(n, dtype=np.int64)
        else:
            self.rows = np.flatnonzero(frame["split"].to_numpy() == split).astype(np.int64)
            if len(self.rows) == 0:
                raise DataError(table, f"no samples in split {split!r}")
        self.has_rgb = np.zeros(n, dtype=bool)
        if with_rgb:
            if "has_rgb" not in frame:
                raise DataError(table, "no 'has_rgb' column: rebuild the store (contract C1)")
            self.has_rgb = frame["has_rgb"].to_numpy(dtype=bool)
        self.samples_per_shard = group["s2"].shards[0]
        names = ("s2", "rgb") if with_rgb else ("s2",)
        self._readers = {name: ShardReader(group[name]) for name in names}
        log.info(
            "%s: %d samples (split %s), arrays %s, %d with a partner",
            self.store,
            len(self.rows),
            split,
            names,
            int(self.has_rgb[self.rows].sum()),
        )

    @property
    def shard_ids(self) -> np.ndarray:
        """The Zarr shard holding each item, for ``ShardGroupedSampler``."""
        return self.rows // self.samples_per_shard

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        """Items ``indices`` in the order asked, read in one ``ShardReader`` call per array."""
        rows = self.rows[np.asarray(indices, dtype=np.int64)]
        batch = {
            "s2": torch.from_numpy(self._readers["s2"].read(rows)),
            "index": torch.from_numpy(rows),
        }
        if self.with_rgb:
            batch["rgb"] = torch.from_numpy(self._readers["rgb"].read(rows))
            batch["has_rgb"] = torch.from_numpy(self.has_rgb[rows])
        return [{k: v[j] for k, v in batch.items()} for j in range(len(rows))]


class ShardGroupedSampler(Sampler[list[int]]):
    """Batches of dataset indices that mostly come from one Zarr shard each.

    Every epoch the order of the shards and the order of items inside each shard are shuffled
    (seeded by ``(seed, epoch)``, so a run is reproducible), then the sequence is cut into
    batches. With ``world_size > 1`` batch ``j`` goes to rank ``j % world_size``: ranks get
    disjoint batches and the same number of them. With ``drop_last`` the incomplete tail is
    dropped (a different one each epoch); without it the batches are padded with items from
    the start of the epoch so every rank still gets as many batches (the only repeats).

    ``set_position(k)`` makes the next iteration skip its first ``k`` batches, to resume a
    training run mid-epoch; ``len`` stays the full number of batches per epoch.
    """

    def __init__(
        self,
        shard_ids: np.ndarray,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need batch_size >= 1 and 0 <= rank < world_size, got "
                f"{batch_size=}, {rank=}, {world_size=}"
            )
        shard_ids = np.asarray(shard_ids)
        by_shard = np.argsort(shard_ids, kind="stable")
        _, starts = np.unique(shard_ids[by_shard], return_index=True)
        self._groups = np.split(by_shard, starts[1:])
        self.n = len(shard_ids)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self._start = 0
        if len(self) == 0:
            raise ValueError(
                f"{self.n} items make no batch of {batch_size} on {world_size} rank(s)"
            )

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        if self.drop_last:
            return self.n // self.batch_size // self.world_size
        return math.ceil(math.ceil(self.n / self.batch_size) / self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's shuffle (and start it from its first batch)."""
        self.epoch = epoch
        self._start = 0

    def set_position(self, batches_done: int) -> None:
        """Skip the first ``batches_done`` batches of the next iteration (mid-epoch resume)."""
        if not 0 <= batches_done <= len(self):
            raise ValueError(f"batches_done={batches_done} is outside [0, {len(self)}]")
        self._start = batches_done

    def epoch_order(self, epoch: int) -> np.ndarray:
        """All items of an epoch, shard by shard in shuffled order, shuffled inside each shard."""
        rng = np.random.default_rng((self.seed, epoch))
        return np.concatenate(
            [rng.permutation(self._groups[g]) for g in rng.permutation(len(self._groups))]
        )

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch``, in order."""
        order = self.epoch_order(epoch)
        size, total = self.batch_size, len(self) * self.world_size
        if self.drop_last:
            cuts = list(order[: total * size].reshape(total, size))
        else:
            cuts = [order[i : i + size] for i in range(0, len(order), size)]
            cuts += list(np.resize(order, (total - len(cuts), size)))
        return [c.tolist() for c in cuts[self.rank :: self.world_size]]

    def __iter__(self) -> Iterator[list[int]]:
        start, self._start = self._start, 0
        yield from self.batches(self.epoch)[start:]


def make_loader(
    dataset: PretrainDataset,
    batch_size: int,
    *,
    workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """A training ``DataLoader``: shard-grouped batches (tail dropped), batched reads, seeded.

    Call ``loader.batch_sampler.set_epoch(epoch)`` each epoch and ``set_position(k)`` to resume.
    """
    sampler = ShardGroupedSampler(
        dataset.shard_ids, batch_size, seed=seed, rank=rank, world_size=world_size, drop_last=True
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
