"""Typed config: strictness on unknown keys and types, and the JSON schema's checks."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from deo.cli import data_config
from deo.config import DataConfig, HarmoniseConfig, digest, from_dict, to_dict
from deo.errors import ConfigError

ROOT = Path(__file__).parents[1]
SCHEMA = str(ROOT / "workflow/schemas/config.schema.yaml")


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / "config" / name).read_text())


@pytest.mark.parametrize("name", ["config.yaml", "paper.yaml"])
def test_shipped_configs_pass_schema_and_typed_config(name: str) -> None:
    cfg = load(name)
    validate(cfg, schema=SCHEMA, set_default=True)
    data = from_dict(DataConfig, cfg["data"])
    assert data.harmonise.tile_size == cfg["data"]["harmonise"]["tile_size"]
    assert to_dict(data)["selection"]["splits"] == cfg["data"]["selection"]["splits"]


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"data\.harmonise: unknown key\(s\) \['tile_sise'\]"):
        from_dict(DataConfig, {"harmonise": {"tile_sise": 64}}, "data")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"tile_size": "64"}, r"data\.tile_size: expected int"),
        ({"tile_size": True}, r"data\.tile_size: expected int"),
        ({"rgb_resampling": "bicubic"}, r"'bicubic' is not one of"),
        ({"resampling": {"10": "linear"}}, r"data\.resampling\.10"),
    ],
)
def test_wrong_types_are_named(value: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_dict(HarmoniseConfig, value, "data")


def test_int_is_accepted_for_float() -> None:
    assert from_dict(HarmoniseConfig, {"gsd_m": 10}).gsd_m == 10.0


def test_tuple_of_fixed_length() -> None:
    with pytest.raises(ConfigError, match="expected 2 items"):
        from_dict(DataConfig, {"mirror": {"size_px": [1, 2, 3]}})


def test_schema_rejects_unknown_key_before_any_job() -> None:
    cfg = load("config.yaml")
    bad = copy.deepcopy(cfg)
    bad["data"]["harmonise"]["tile_sise"] = 64
    with pytest.raises(WorkflowError, match="tile_sise"):
        validate(bad, schema=SCHEMA)


def test_schema_rejects_wrong_type() -> None:
    bad = load("config.yaml")
    bad["data"]["selection"]["max_samples"] = "many"
    with pytest.raises(WorkflowError, match=r"max_samples|many"):
        validate(bad, schema=SCHEMA)


def test_schema_fills_defaults() -> None:
    cfg = load("config.yaml")
    del cfg["data"]["harmonise"]["gsd_m"]
    validate(cfg, schema=SCHEMA, set_default=True)
    assert cfg["data"]["harmonise"]["gsd_m"] == 10.0


def test_stage_insists_on_the_sections_it_reads() -> None:
    with pytest.raises(ConfigError, match=r"lacks section\(s\) \['fetch'\]"):
        data_config('{"sentinel": {}}', "sentinel", "fetch")
    with pytest.raises(ConfigError, match="not valid JSON"):
        data_config("{", "sentinel")


def test_digest_is_order_independent_and_sensitive() -> None:
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1})
    assert digest({"a": 1}) != digest({"a": 2})
