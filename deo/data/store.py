"""The pre-training store: per-job shard stores, their merge into one Zarr v3 group, and readers.

Harmonise jobs run in parallel, so each writes its own *shard store* (a directory holding a
small Zarr group and a Parquet table) and never touches a shared file. The merge stage then
orders every sample by its global ``order`` key, applies a seeded permutation
(:func:`shuffled_rows`), and writes the final store once, one Zarr shard at a time (shards in
parallel threads), so each shard file is written exactly once and compressed only once.

Why shuffled: training reads a batch from one or two shards (``ShardGroupedSampler``) to keep
reads sequential. In the sorted order a shard is a few locations of one category and their
revisits; in a random order each shard is a uniform sample, so a shard-grouped batch is too
(the coding-rate term of the loss is computed over the batch). The table keeps every key
(split, category, location_id, image_id, key, order), so the sorted order is one sort away.

Final store layout (see DESIGN.md, "Pre-training store"): a Zarr v3 group with ``s2`` uint16
``(N, 10, T, T)`` in ``MS_BANDS`` order and, when built with RGB, ``rgb`` uint8 ``(N, 3, R, R)``
(R = ``rgb_tile_size``, the aerial partner over the same footprint; zeros without one);
chunks of one sample inside shards of ``samples_per_shard`` samples; Blosc zstd with bitshuffle.
The per-sample table (row i describes sample i, with an ``index`` column) lives beside it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import google_crc32c
import numpy as np
import pandas as pd
import zarr
from numcodecs import blosc
from zarr.codecs import BloscCodec
from zarr.storage import LocalStore

from deo.config import digest
from deo.data.bands import BY_NAME, MS_BANDS
from deo.errors import DataError

log = logging.getLogger(__name__)

# Snakemake marks a directory output with a .snakemake_timestamp file; zarr warns about any
# foreign file in a group when it lists members. The marker is expected: don't warn about it.
warnings.filterwarnings("ignore", message=r"Object at \.snakemake_timestamp is not recognized")

RGB_CHANNELS: tuple[str, ...] = ("R", "G", "B")
"""Channel names of the ``rgb`` array, in array order (also the keys of their statistics)."""

SHARD_ARRAYS = "arrays.zarr"
SHARD_TABLE = "table.parquet"
SHARD_ATTR = "deo_shard"
SHARD_STATE = "partial.json"
"""A shard store's record of the settings it is being built with, written last on creation."""
RESERVED_META = ("position", "index")
"""Table columns the store code owns: a caller's meta dict must not use them."""

STORE_ATTRS = ("bands", "wavelengths_nm", "tile_size", "rgb_tile_size", "gsd_m")
"""Attributes ``merge_shards`` sets itself; a caller's provenance attrs may not shadow them."""


def _array_shapes(
    tile_size: int, rgb_tile_size: int | None
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Per-sample shape and dtype of each array, the single definition used by writer and merge.

    ``rgb_tile_size`` None means a store without ``rgb``.
    """
    shapes = {"s2": ((len(MS_BANDS), tile_size, tile_size), np.dtype(np.uint16))}
    if rgb_tile_size is not None:
        rgb = (len(RGB_CHANNELS), rgb_tile_size, rgb_tile_size)
        shapes["rgb"] = (rgb, np.dtype(np.uint8))
    return shapes


def shuffled_rows(n: int, seed: int | None) -> np.ndarray:
    """Row ``i`` of the final store is sample ``shuffled_rows(n, seed)[i]`` of the sorted order.

    ``seed`` None keeps the sorted order (the identity).
    """
    if seed is None:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng(seed).permutation(n).astype(np.int64)


def write_json_atomic(data: Any, path: Path) -> None:
    """Write JSON via a temporary file and rename: a kill leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, sort_keys=True))
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it is absent or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_parquet_atomic(df: pd.DataFrame, path: Path) -> None:
    """Write via a temporary file and rename, so a killed job never leaves a truncated table."""
    tmp = path.with_name(path.name + ".tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


class ShardWriter:
    """A harmonise job's partial store: preallocated ``(n, ...)`` arrays + a metadata table.

    ``path`` is a directory holding ``arrays.zarr`` (one chunk per sample, light compression:
    the data is temporary) and ``table.parquet`` (one row per written sample, with its
    ``position`` in the arrays). Re-opening an existing shard resumes it: ``done_keys`` says
    which inputs are already in, so a killed job skips them. The table is only rewritten after
    the arrays were written, so a key listed there always has its data on disk. A job should
    give each input a fixed position (e.g. its index in the job's input list), so a sample
    that was written but not yet listed is simply rewritten in place on resume.

    ``settings`` (whatever determines the samples: the job's config and inputs) is digested
    into ``partial.json``, written atomically once the arrays exist. A shard is resumed only
    when that record matches this job; otherwise (other settings, or a kill before the record
    was written) it is started over with a log line, so a partial shard never blocks a rerun
    and never mixes settings.
    """

    def __init__(
        self,
        path: Path,
        n: int,
        tile_size: int,
        with_rgb: bool,
        *,
        rgb_tile_size: int | None = None,
        flush_every: int = 64,
        settings: Any = None,
    ) -> None:
        self.path = Path(path)
        self.n = n
        self.tile_size = tile_size
        self.with_rgb = with_rgb
        self.rgb_tile_size = (rgb_tile_size or tile_size) if with_rgb else None
        self.flush_every = flush_every
        self._shapes = _array_shapes(tile_size, self.rgb_tile_size)
        self._rows: dict[int, dict[str, Any]] = {}
        self._positions: dict[str, int] = {}
        self._unflushed = 0
        expected = {
            "n": n,
            "tile_size": tile_size,
            "with_rgb": with_rgb,
            "rgb_tile_size": self.rgb_tile_size,
        }
        state = {"shard": expected, "settings": digest(settings)}
        arrays_path = self.path / SHARD_ARRAYS
        group = self._resume(arrays_path, state)
        if group is None:
            group = self._create(arrays_path, expected)
            self.flush()
            write_json_atomic(state, self.path / SHARD_STATE)
        self._arrays = {name: group[name] for name in self._shapes}

    def _resume(self, arrays_path: Path, state: dict[str, Any]) -> zarr.Group | None:
        """The existing shard's arrays when it was built for exactly ``state``, else None (after
        removing whatever is there, saying why)."""
        if not self.path.exists():
            return None
        found = read_json(self.path / SHARD_STATE)
        if found == state:
            try:
                group = zarr.open_group(arrays_path, mode="r+", zarr_format=3)
                missing = [name for name in self._shapes if name not in group.array_keys()]
                if not missing:
                    self._load_table()
                    log.info(
                        "resuming shard %s: %d of %d samples done",
                        self.path,
                        len(self._rows),
                        self.n,
                    )
                    return group
                why = f"its arrays {missing} are missing"
            except (OSError, ValueError, KeyError, zarr.errors.BaseZarrError) as e:
                why = f"it is unreadable ({type(e).__name__}: {e})"
            self._rows.clear()
            self._positions.clear()
        elif found is None:
            why = f"it has no readable {SHARD_STATE} (killed while being created, or older)"
        else:
            why = f"it was started with other settings ({found}, this job: {state})"
        log.warning("starting partial shard %s over: %s", self.path, why)
        shutil.rmtree(self.path)
        return None

    def _create(self, arrays_path: Path, expected: dict[str, Any]) -> zarr.Group:
        self.path.mkdir(parents=True, exist_ok=True)
        group = zarr.open_group(arrays_path, mode="w", zarr_format=3)
        codec = BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle")
        for name, (shape, dtype) in self._shapes.items():
            group.create_array(
                name,
                shape=(self.n, *shape),
                dtype=dtype,
                chunks=(1, *shape),
                compressors=codec,
                fill_value=0,
            )
        group.attrs[SHARD_ATTR] = expected
        return group

    def _load_table(self) -> None:
        table_path = self.path / SHARD_TABLE
        if not table_path.exists():
            return
        for row in read_shard_table(self.path).to_dict("records"):
            self._rows[int(row["position"])] = row
            self._positions[str(row["key"])] = int(row["position"])

    @property
    def done_keys(self) -> set[str]:
        """``meta["key"]`` of every sample already written (a resumed job skips these)."""
        return set(self._positions)

    def _check_array(self, name: str, value: np.ndarray | None) -> np.ndarray:
        shape, dtype = self._shapes[name]
        if not isinstance(value, np.ndarray) or value.shape != shape or value.dtype != dtype:
            got = "None" if value is None else f"{getattr(value, 'shape', '?')} {value.dtype}"
            raise ValueError(f"{name} must be a {dtype} array of shape {shape}, got {got}")
        return value

    def write(self, position: int, s2: np.ndarray, rgb: np.ndarray | None, meta: dict) -> None:
        """Write one sample at ``position``; ``meta`` needs ``key`` (str) and ``order`` (int).

        Re-writing the same key at the same position is allowed (a resumed job may repeat the
        sample it was killed on); a key at two positions, or two keys at one, is a bug.
        """
        if not 0 <= position < self.n:
            raise ValueError(f"position {position} is outside this shard's [0, {self.n})")
        key, order = meta.get("key"), meta.get("order")
        if not isinstance(key, str):
            raise TypeError(f"meta['key'] must be a str, got {key!r}")
        if not isinstance(order, int | np.integer) or isinstance(order, bool):
            raise TypeError(f"meta['order'] must be an int, got {order!r}")
        if clash := [c for c in RESERVED_META if c in meta]:
            raise ValueError(f"meta may not use the reserved column(s) {clash}")
        if self._positions.get(key, position) != position:
            raise ValueError(f"key {key!r} was already written at position {self._positions[key]}")
        held = self._rows.get(position, {}).get("key", key)
        if held != key:
            raise ValueError(f"position {position} already holds key {held!r}, not {key!r}")
        arrays = {"s2": self._check_array("s2", s2)}
        if self.with_rgb:
            arrays["rgb"] = self._check_array("rgb", rgb)
        elif rgb is not None:
            raise ValueError("this shard was created without RGB, but an rgb array was given")
        for name, value in arrays.items():
            self._arrays[name][position] = value
        self._rows[position] = {"position": position, **meta, "order": int(order)}
        self._positions[key] = position
        self._unflushed += 1
        if self._unflushed >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Persist the table, so a job killed after this point resumes without redoing work."""
        rows = [self._rows[p] for p in sorted(self._rows)]
        df = pd.DataFrame(rows) if rows else _empty_shard_table()
        _write_parquet_atomic(df, self.path / SHARD_TABLE)
        self._unflushed = 0

    def close(self) -> None:
        self.flush()
        log.info("closed shard %s: %d of %d positions written", self.path, len(self._rows), self.n)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _empty_shard_table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "position": pd.Series(dtype="int64"),
            "key": pd.Series(dtype="object"),
            "order": pd.Series(dtype="int64"),
        }
    )


def read_shard_table(path: Path) -> pd.DataFrame:
    """The metadata table of a shard store (one row per written sample, with ``position``)."""
    table_path = Path(path) / SHARD_TABLE
    if not table_path.exists():
        raise DataError(path, f"not a shard store: {SHARD_TABLE} is missing")
    return pd.read_parquet(table_path)


@dataclass(frozen=True)
class _Shard:
    path: Path
    arrays: dict[str, zarr.Array]
    table: pd.DataFrame
    tile_size: int
    rgb_tile_size: int | None


def _open_shard(path: Path) -> _Shard:
    path = Path(path)
    try:
        group = zarr.open_group(path / SHARD_ARRAYS, mode="r", zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
        raise DataError(path, f"not a shard store: no Zarr group at {SHARD_ARRAYS}") from e
    info = group.attrs.get(SHARD_ATTR)
    if not isinstance(info, dict):
        raise DataError(path, f"not a shard store: the group has no '{SHARD_ATTR}' attribute")
    arrays = {name: group[name] for name in group.array_keys()}
    rgb_tile_size = info.get("rgb_tile_size", info["tile_size"]) if info["with_rgb"] else None
    return _Shard(path, arrays, read_shard_table(path), info["tile_size"], rgb_tile_size)


def _merged_table(shards: Sequence[_Shard]) -> pd.DataFrame:
    """All shards' rows in global ``order`` (ties broken by key), tagged with their shard."""
    tables = [s.table.assign(_shard=i) for i, s in enumerate(shards)]
    table = pd.concat(tables, ignore_index=True) if tables else _empty_shard_table()
    dup = table["key"].duplicated(keep=False)
    if dup.any():
        key = table.loc[dup, "key"].iloc[0]
        where = table.loc[table["key"] == key, "_shard"].tolist()
        raise DataError(
            shards[where[-1]].path,
            f"duplicate sample key {key!r} (also in {[str(shards[i].path) for i in where[:-1]]})",
        )
    return table.sort_values(["order", "key"], kind="stable", ignore_index=True)


def _check_consistent(shards: Sequence[_Shard]) -> None:
    first = shards[0]
    for s in shards[1:]:
        if (s.tile_size, s.rgb_tile_size) != (first.tile_size, first.rgb_tile_size):
            raise DataError(
                s.path,
                f"shard has tile_size={s.tile_size}, rgb_tile_size={s.rgb_tile_size} but "
                f"{first.path} has tile_size={first.tile_size}, "
                f"rgb_tile_size={first.rgb_tile_size}",
            )


def _read_rows(array: zarr.Array, rows: np.ndarray) -> np.ndarray:
    """``array[rows]`` of a shard store's (unsharded) array, in the order given.

    Zarr's per-call overhead dwarfs decoding one small chunk, so contiguous rows (a job's
    samples in sorted order) are read as one slice. Scattered rows (the shuffled merge) are
    read one chunk each: in zarr 3.1 that costs about half the CPU of one orthogonal selection
    of the same rows (which is very slow on the final, *sharded* arrays too; ``ShardReader`` is
    for those).
    """
    unique, inverse = np.unique(np.asarray(rows, dtype=np.int64), return_inverse=True)
    if unique[-1] - unique[0] + 1 == len(unique):
        data = array[int(unique[0]) : int(unique[-1]) + 1]
    else:
        data = np.stack([array[int(r)] for r in unique])
    in_order = len(inverse) == len(unique) and bool((np.diff(inverse) > 0).all())
    return data if in_order else data[inverse]


def _gather(shards: Sequence[_Shard], block: pd.DataFrame, name: str) -> np.ndarray:
    """Read one block of samples (in block order) from whichever shard stores hold them."""
    first = shards[0].arrays[name]
    out = np.empty((len(block), *first.shape[1:]), dtype=first.dtype)
    for shard_id, rows in block.groupby("_shard").indices.items():
        positions = block["position"].to_numpy()[rows]
        out[rows] = _read_rows(shards[shard_id].arrays[name], positions)
    return out


def _replace_dir(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(src, dst)


def merge_shards(
    shards: Sequence[Path],
    out_store: Path,
    out_table: Path,
    *,
    samples_per_shard: int,
    clevel: int,
    attrs: dict,
    gsd_m: float | None = None,
    shuffle_seed: int | None = None,
    threads: int = 1,
) -> int:
    """Merge shard stores into the final store and table; returns the number of samples N.

    Samples go in the sorted (``order``, key) order permuted by ``shuffle_seed`` (None: sorted;
    see :func:`shuffled_rows`). ``threads`` output shards are gathered, compressed and written
    at once (each shard file by one thread); the result does not depend on ``threads``.
    Everything is written under ``<out_store>.tmp`` / ``<out_table>.tmp`` and renamed at the
    end, so a killed merge never leaves a half-written store at the output path.
    """
    out_store, out_table = Path(out_store), Path(out_table)
    if clash := sorted(set(attrs) & set(STORE_ATTRS)):
        raise ValueError(f"attrs may not set {clash}: merge_shards writes them itself")
    if not shards:
        raise DataError(out_store, "no samples: no shard stores were given to merge")
    opened = [_open_shard(p) for p in shards]
    _check_consistent(opened)
    table = _merged_table(opened)
    n = len(table)
    if n == 0:
        raise DataError(out_store, f"no samples: all {len(opened)} shard stores are empty")
    table = table.iloc[shuffled_rows(n, shuffle_seed)].reset_index(drop=True)
    tile_size, rgb_tile_size = opened[0].tile_size, opened[0].rgb_tile_size

    tmp_store = out_store.with_name(out_store.name + ".tmp")
    if tmp_store.exists():
        shutil.rmtree(tmp_store)
    group = zarr.open_group(tmp_store, mode="w", zarr_format=3)
    arrays = {}
    for name, (shape, dtype) in _array_shapes(tile_size, rgb_tile_size).items():
        arrays[name] = group.create_array(
            name,
            shape=(n, *shape),
            dtype=dtype,
            chunks=(1, *shape),
            shards=(samples_per_shard, *shape),
            compressors=BloscCodec(cname="zstd", clevel=clevel, shuffle="bitshuffle"),
            fill_value=0,
        )

    def write_shard(start: int) -> None:
        block = table.iloc[start : start + samples_per_shard]
        for name, array in arrays.items():
            array[start : start + len(block)] = _gather(opened, block, name)

    starts = range(0, n, samples_per_shard)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for i, _ in enumerate(pool.map(write_shard, starts)):
            if i % max(1, len(starts) // 20) == 0 or i == len(starts) - 1:
                log.info("merged %d of %d samples", min(n, (i + 1) * samples_per_shard), n)
    group.attrs.update(
        {
            "bands": list(MS_BANDS),
            "wavelengths_nm": [BY_NAME[b].wavelength_nm for b in MS_BANDS],
            "tile_size": tile_size,
            **({"rgb_tile_size": rgb_tile_size} if rgb_tile_size is not None else {}),
            **({"gsd_m": gsd_m} if gsd_m is not None else {}),
            **attrs,
        }
    )

    final = table.drop(columns=["position", "_shard"]).assign(index=np.arange(n, dtype=np.int64))
    out_table.parent.mkdir(parents=True, exist_ok=True)
    tmp_table = out_table.with_name(out_table.name + ".tmp")
    final.to_parquet(tmp_table, index=False)
    _replace_dir(tmp_store, out_store)
    os.replace(tmp_table, out_table)
    log.info(
        "wrote %s (%d samples from %d shard stores) and %s", out_store, n, len(opened), out_table
    )
    return n


def open_store(path: Path) -> zarr.Group:
    """Open a final store read-only, failing with a message that says what is missing."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "no such pre-training store; run the merge stage first")
    try:
        group = zarr.open_group(path, mode="r", zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
        raise DataError(path, "not a Zarr v3 group (no zarr.json): not a DEO store") from e
    if "s2" not in group.array_keys():
        raise DataError(path, "not a DEO pre-training store: the 's2' array is missing")
    missing = [a for a in ("bands", "tile_size") if a not in group.attrs]
    if missing:
        raise DataError(path, f"not a DEO pre-training store: group attrs {missing} are missing")
    return group


def store_bands(group: zarr.Group) -> tuple[str, ...]:
    """Band names of the ``s2`` array, in channel order."""
    return tuple(group.attrs["bands"])


_EMPTY_CHUNK = 2**64 - 1
"""Shard-index offset of a chunk that was never written (it reads as the fill value)."""


def _is_merged_layout(array: zarr.Array) -> bool:
    """Whether ``array`` has the layout ``merge_shards`` writes, the only one ``ShardReader`` reads:
    a local store, one sharding codec over one-sample chunks of little-endian Blosc-compressed
    bytes, and an index at the end of each shard with a CRC32C."""
    codecs = array.metadata.to_dict()["codecs"]
    if not isinstance(array.store, LocalStore) or len(codecs) != 1:
        return False
    if codecs[0]["name"] != "sharding_indexed":
        return False
    config = codecs[0]["configuration"]

    def names(chain: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
        return [(c["name"], c.get("configuration", {}).get("endian", "little")) for c in chain]

    return (
        tuple(config["chunk_shape"]) == (1, *array.shape[1:])
        and names(config["codecs"]) == [("bytes", "little"), ("blosc", "little")]
        and names(config["index_codecs"]) == [("bytes", "little"), ("crc32c", "little")]
        and config["index_location"] == "end"
    )


class ShardReader:
    """Whole samples of a final-store array, read straight from its shard files.

    Why not zarr's own indexing: with one-sample chunks, zarr 3.1 spends far more time in Python
    and thread-pool hand-offs per chunk than decoding it takes (and an orthogonal selection
    inside a shard expands into per-element coordinates): a random batch of 64 samples costs
    20-180 ms there against ~3 ms here. A batch needs only the shard's index and the byte ranges
    of its chunks, so this reads exactly those with ``os.pread`` (in file order) and decodes them
    with numcodecs' Blosc straight into the output. It accepts only the layout ``merge_shards``
    writes (checked against the array's metadata) and verifies each shard index's CRC32C, as
    zarr does.
    """

    def __init__(self, array: zarr.Array) -> None:
        self.root = Path(str(getattr(array.store, "root", ""))) / array.path
        if not _is_merged_layout(array):
            raise DataError(self.root, "not the sharded layout merge_shards writes")
        self.n = array.shape[0]
        self.per_shard = array.shards[0]
        self.sample_shape = array.shape[1:]
        self.dtype = np.dtype(array.dtype).newbyteorder("<")
        self.fill_value = array.fill_value
        self._chunk_key = array.metadata.chunk_key_encoding.encode_chunk_key

    def read(self, rows: np.ndarray) -> np.ndarray:
        """``array[rows]`` in the order given; each shard file is opened once per call."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n):
            raise IndexError(f"rows outside [0, {self.n}) requested from {self.root}")
        out = np.empty((len(rows), *self.sample_shape), dtype=self.dtype)
        shards = rows // self.per_shard
        for shard in np.unique(shards):
            which = np.flatnonzero(shards == shard)
            self._read_shard(int(shard), rows[which] % self.per_shard, out, which)
        return out

    def _read_shard(
        self, shard: int, inner: np.ndarray, out: np.ndarray, which: np.ndarray
    ) -> None:
        path = self.root / self._chunk_key((shard,) + (0,) * len(self.sample_shape))
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            out[which] = self.fill_value
            return
        try:
            index = self._index(fd, path)[inner]
            in_file_order = np.argsort(index[:, 0], kind="stable")
            for j, k, (offset, nbytes) in zip(
                which[in_file_order].tolist(),
                inner[in_file_order].tolist(),
                index[in_file_order].tolist(),
                strict=True,
            ):
                if offset == _EMPTY_CHUNK:
                    out[j] = self.fill_value
                    continue
                data = os.pread(fd, nbytes, offset)
                if len(data) != nbytes:
                    raise DataError(path, f"truncated shard: chunk {k} lies past the end")
                blosc.decompress(data, out[j])
        finally:
            os.close(fd)

    def _index(self, fd: int, path: Path) -> np.ndarray:
        """The shard's ``(chunks, 2)`` table of (offset, nbytes), checksum verified."""
        size = self.per_shard * 16 + 4
        end = os.fstat(fd).st_size
        raw = os.pread(fd, size, end - size) if end >= size else b""
        if len(raw) != size or google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            raise DataError(path, "corrupt or truncated shard: its index checksum does not match")
        return np.frombuffer(raw[:-4], dtype="<u8").reshape(self.per_shard, 2)


def read_store_table(path: Path, group: zarr.Group) -> pd.DataFrame:
    """The per-sample table of a store, checked to describe exactly the store's N samples."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "no such sample table; run the merge stage first")
    table = pd.read_parquet(path)
    n = group["s2"].shape[0]
    index = table["index"].to_numpy() if "index" in table else None
    if index is None or len(index) != n or (index != np.arange(n)).any():
        raise DataError(path, f"table does not match the store: need rows with index 0..{n - 1}")
    return table
