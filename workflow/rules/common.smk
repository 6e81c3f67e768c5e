import json
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from deo.config import digest
from deo.train.config import run_config
from deo.workflow import prefer_beside_python

validate(config, schema="../schemas/config.schema.yaml", set_default=True)


envvars:
    "PATH",


prefer_beside_python()


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
    """JSON of the data config sections a job reads; a change to them reruns the job."""
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


TEACHER = config["teacher"]
TINY_TEACHER = f"resources/teacher/tiny-{digest(TEACHER)}.safetensors"


def teacher_section():
    """The teacher config as training reads it: the tiny teacher's weights are our own file."""
    return {**TEACHER, "weights": TINY_TEACHER} if TEACHER["tiny"] else TEACHER


def teacher_params():
    return json.dumps(teacher_section(), sort_keys=True)


def check_teacher_weights():
    """A missing weights file fails before any job starts, with where to obtain it."""
    if TEACHER["tiny"]:
        return
    weights = TEACHER["weights"]
    if not weights or not Path(weights).is_file():
        raise WorkflowError(
            f"teacher.weights: {weights!r} is not a file. The DINOv3 weights for "
            f"{TEACHER['arch']} are licence-gated: request them at https://ai.meta.com/dinov3/ "
            "(or the facebook/dinov3-* Hugging Face repositories), save the .pth locally "
            "and set teacher.weights to its path."
        )


check_teacher_weights()


def train_params(run):
    """The run's resolved train section: a change to it reruns that run's training."""
    return json.dumps(run_config(config["train"], run), sort_keys=True)


def train_work_dir(run):
    """Where a run's resumable state lives, keyed by its config (outside Snakemake's outputs)."""
    key = digest(
        {"train": run_config(config["train"], run), "teacher": teacher_section()}
    )
    return f"results/train/{run}/work-{key}"


def distill_inputs(wildcards):
    inputs = {
        "store": "results/data/pretrain.zarr",
        "table": "results/data/pretrain.parquet",
        "stats": "results/data/stats.json",
    }
    if TEACHER["tiny"]:
        inputs["teacher"] = TINY_TEACHER
    return inputs


def all_targets():
    return [
        "results/data/counts.json",
        *expand("results/train/{run}/export", run=config["train"]["runs"]),
    ]
