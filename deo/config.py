"""Typed configuration: one dataclass per config section, strict about unknown keys and types.

The Snakefile validates the whole config against ``workflow/schemas/config.schema.yaml`` before
any job starts; each ``deo`` command re-reads its own section through these classes, so a
command run by hand gets the same checks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args, get_origin

from deo.errors import ConfigError

T = TypeVar("T")

Resampling = Literal["nearest", "bilinear", "cubic", "average", "lanczos"]
Tiling = Literal["resize", "fixed_gsd"]
RgbJsonVariant = Literal["object", "id_minus_one_first", "footprint_location", "no_location"]


@dataclass(frozen=True)
class MirrorConfig:
    """A synthetic mirror of the fMoW hosts in the real file formats (the embedded default)."""

    seed: int = 0
    categories: tuple[str, ...] = ("airport", "crop_field", "lake_or_pond", "port")
    locations_per_category: int = 4
    images_per_location: int = 3
    ms_only_images_per_location: int = 1
    size_px: tuple[int, int] = (48, 96)
    rgb_size_px: tuple[int, int] = (192, 320)
    bad_inputs: bool = True
    size_dist: Literal["uniform", "log_uniform"] = "uniform"
    s2_dtypes: tuple[Literal["uint16", "float32"], ...] = ("uint16",)
    rgb_json_variants: tuple[RgbJsonVariant, ...] = ("object",)
    member_dot_slash: bool = False


@dataclass(frozen=True)
class SentinelSource:
    url: str = "https://stacks.stanford.edu/file/druid:vg497cb6002/"
    archive: str = "fmow-sentinel.tar.gz"
    archive_prefix: str = "fmow-sentinel/"
    csvs: dict[str, str] = field(
        default_factory=lambda: {"train": "train.csv", "val": "val.csv", "test": "test_gt.csv"}
    )
    folders: dict[str, str] = field(default_factory=lambda: {"test": "test_gt"})


@dataclass(frozen=True)
class RgbSource:
    enabled: bool = True
    url: str = "https://spacenet-dataset.s3.amazonaws.com/Hosted-Datasets/fmow/fmow-rgb/"
    mappings: dict[str, str] = field(default_factory=lambda: {"test": "test_gt_mapping.json"})


@dataclass(frozen=True)
class FetchConfig:
    workers: int = 16
    retries: int = 5
    backoff_s: float = 2.0
    timeout_s: float = 60.0
    rehash: bool = False
    refresh: bool = False


@dataclass(frozen=True)
class SelectionConfig:
    splits: tuple[str, ...] = ("train", "val")
    max_samples: int = 500_000
    seed: int = 0


@dataclass(frozen=True)
class HarmoniseConfig:
    tile_size: int = 224
    tiling: Tiling = "resize"
    gsd_m: float = 10.0
    resampling: dict[str, Resampling] = field(
        default_factory=lambda: {"10": "bilinear", "20": "bilinear", "60": "bilinear"}
    )
    rgb_resampling: Resampling = "average"
    rgb_tile_size: int = 256
    coreg_min_score: float = 0.3
    rgb_max_pixels: int = 300_000_000
    rgb_gsd_tolerance: float = 0.25
    nodata: int = 0
    max_nodata_fraction: float = 0.5
    shards: int = 64


@dataclass(frozen=True)
class StoreConfig:
    samples_per_shard: int = 256
    clevel: int = 5
    shuffle_seed: int = 0
    merge_threads: int = 1


@dataclass(frozen=True)
class PreflightConfig:
    """How much of the hosts ``deo preflight`` reads (ranged) before the big download."""

    archive_bytes: int = 32 << 20
    members: int = 200
    scenes: int = 24
    csv_bytes: int = 1 << 20
    partners: int = 8
    partner_bytes: int = 256 << 20
    min_pair_share: float = 0.5


@dataclass(frozen=True)
class DataConfig:
    mirror: MirrorConfig | None = None
    sentinel: SentinelSource = field(default_factory=SentinelSource)
    rgb: RgbSource = field(default_factory=RgbSource)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    harmonise: HarmoniseConfig = field(default_factory=HarmoniseConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    preflight: PreflightConfig = field(default_factory=PreflightConfig)
    max_reject_fraction: float = 0.05


def from_dict(cls: type[T], data: Any, where: str = "config") -> T:
    """Build dataclass ``cls`` from plain data, failing on unknown keys and wrong types."""
    return typing.cast(T, _convert(cls, data, where))


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        known = {f.name for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(known)}")
        return tp(**{k: _convert(hints[k], v, f"{where}.{k}") for k, v in value.items()})
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
        pairs = enumerate(zip(args, value, strict=True))
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in pairs)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        key_tp, val_tp = get_args(tp)
        return {
            _convert(key_tp, str(k), where): _convert(val_tp, v, f"{where}.{k}")
            for k, v in value.items()
        }
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    if tp is Any:
        return value
    raise ConfigError(f"{where}: unsupported config type {tp!r}")


def to_dict(cfg: Any) -> Any:
    """Plain JSON-ready data of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def digest(data: Any) -> str:
    """A stable short digest of plain config data, for provenance and cache keys."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
