import json
import os
import sys
from pathlib import Path

from snakemake.utils import validate

from deo.config import digest


validate(config, schema="../schemas/config.schema.yaml", set_default=True)

# Jobs find the `deo` command installed beside the Python running Snakemake (a venv need not
# be activated); a rule's conda environment, when deployed, comes first on PATH.
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])


wildcard_constraints:
    shard=r"\d+",


DATA = config["data"]
ENV = "../../envs/deo.yaml"
MIRROR = "resources/mirror-hosts"
# Downloads live outside Snakemake's outputs so interrupted and repeated fetches resume; a
# synthetic mirror's downloads are keyed by its config, since its content changes with it.
DOWNLOADS = (
    f"resources/fmow-mirror-{digest(DATA['mirror'])}"
    if DATA["mirror"]
    else "resources/fmow"
)
SENTINEL_DIR = f"{DOWNLOADS}/sentinel"
SCENES_DIR = f"{DOWNLOADS}/sentinel-scenes"
RGB_DIR = f"{DOWNLOADS}/rgb"


def data_params(*sections):
    """The data config sections a rule reads, as JSON: a change to them reruns the rule."""
    return json.dumps({k: DATA[k] for k in sections}, sort_keys=True)


def source_url(kind):
    """Base URL of the Sentinel or RGB host, or of the synthetic mirror standing in for it."""
    if DATA["mirror"]:
        return Path(MIRROR, kind).resolve().as_uri() + "/"
    return DATA[kind]["url"]


def mirror_input(wildcards):
    return [MIRROR] if DATA["mirror"] else []


def shard_ids():
    return range(DATA["harmonise"]["shards"])


def rgb_args(wildcards, input):
    """Pair's arguments for the optical partners, empty for an MS-only store."""
    if not DATA["rgb"]["enabled"]:
        return ""
    return f"--rgb-root {RGB_DIR} --rgb-record {input.rgb_record}"


def pair_inputs(wildcards):
    inputs = {
        "selection": "results/data/selection.parquet",
        "extracted": "results/data/extracted.csv",
        "skipped": "results/data/extract_skipped.csv",
    }
    if DATA["rgb"]["enabled"]:
        inputs["rgb_record"] = "results/data/rgb_fetch.csv"
    return inputs


def all_targets():
    return [
        "results/data/stats.json",
        "results/data/counts.json",
    ]
