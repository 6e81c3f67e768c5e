import json
from pathlib import Path

from snakemake.exceptions import WorkflowError

from deo.cache.spec import GlobalViews, split_teacher_section
from deo.config import digest, to_dict
from deo.train.config import parse_train, run_config
from deo.workflow import (
    clear_stale_locks,
    prefer_beside_python,
    replace_config,
    resolve_config,
)

# --configfile files replace the embedded default instead of patching it, so no demo value can
# leak into config/paper.yaml; `deo config` prints the same resolved, validated dict.
replace_config(
    config,
    resolve_config(
        workflow.overwrite_configfiles,
        workflow.config_settings.config,
        root=workflow.basedir,
    ),
)


envvars:
    "PATH",


prefer_beside_python()
# A run killed with SIGKILL leaves Snakemake's locks: the next plain run removes them itself.
if workflow.is_main_process:
    clear_stale_locks()


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


# What preflight reads besides the hosts' sections, for its estimates only (see rule preflight).
PREFLIGHT_SETTINGS = data_params(
    "harmonise", "selection", "store", "max_reject_fraction"
)


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


# The VFM's own keys (what TeacherConfig reads) apart from the caching ones (mode, views, cache),
# so that caching settings neither change the teacher's identity nor rerun tiny_teacher.
TEACHER, CACHING = split_teacher_section(config["teacher"])
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
        {
            "train": run_config(config["train"], run),
            "teacher": teacher_section(),
            **cache_work_key(run),
        }
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
    if wildcards.run in CACHE_OF_RUN:
        inputs["teacher_cache"] = f"results/teacher/{CACHE_OF_RUN[wildcards.run]}.zarr"
    return inputs


def teacher_cache_arg(wildcards, input):
    """Training's --teacher-cache in cached mode, nothing online."""
    if wildcards.run not in CACHE_OF_RUN:
        return ""
    return f"--teacher-cache {input.teacher_cache}"


# ---- teacher cache (teacher.mode: cached) ------------------------------------------------
# One cache per kind of teacher input ("variant": RGB from the partner or derived from MS, with
# or without optical augmentation), shared by every run that draws its global views alike.


def run_views(run):
    """The global-view settings a run draws (its teacher's input), as the cache records them."""
    return to_dict(
        GlobalViews.from_train(parse_train(run_config(config["train"], run)))
    )


def cached_runs():
    """The runs that read a cache: in cached mode, every run whose losses use the VFM."""
    if CACHING["mode"] != "cached":
        return []
    train = config["train"]
    return [r for r in train["runs"] if parse_train(run_config(train, r)).uses_vfm]


def cache_variants():
    """(variant -> global-view settings, run -> variant); runs sharing a variant must agree."""
    variants, of_run = {}, {}
    for run in cached_runs():
        views = run_views(run)
        name = f"{views['rgb']}-{'aug' if views['optical_aug'] else 'plain'}"
        if variants.setdefault(name, views) != views:
            other = next(r for r, v in of_run.items() if v == name)
            diff = sorted(k for k in views if views[k] != variants[name][k])
            raise WorkflowError(
                f"train.runs {other!r} and {run!r} would share the teacher cache {name!r} but "
                f"draw different global views ({', '.join(diff)}): give them the same "
                "train crops, or set teacher.mode: online"
            )
        of_run[run] = name
    return variants, of_run


CACHE_VARIANTS, CACHE_OF_RUN = cache_variants()


def cache_config():
    """K and teacher.cache, as the cache jobs read them (CacheConfig)."""
    return {"views": CACHING["views"], **CACHING["cache"]}


def cache_params():
    return json.dumps(cache_config(), sort_keys=True)


def cache_views_params(variant):
    """The variant's global-view settings: a change to them reruns its cache."""
    return json.dumps(CACHE_VARIANTS[variant], sort_keys=True)


def cache_work_dir(variant):
    """Where a cache's resumable parts live until assembled, keyed by everything they hold."""
    key = digest(
        {
            "teacher": teacher_section(),
            "views": CACHE_VARIANTS[variant],
            "cache": cache_config(),
        }
    )
    return f"results/teacher/{variant}/work-{key}"


def cache_work_key(run):
    """What a cached run's resumable state also depends on (nothing for an online run)."""
    if run not in CACHE_OF_RUN:
        return {}
    return {"teacher_cache": {"views": run_views(run), "cache": cache_config()}}


def cache_part_ids():
    return range(CACHING["cache"]["shards"])


def cache_inputs(wildcards):
    inputs = {
        "store": "results/data/pretrain.zarr",
        "table": "results/data/pretrain.parquet",
        "stats": "results/data/stats.json",
    }
    inputs["weights"] = TINY_TEACHER if TEACHER["tiny"] else TEACHER["weights"]
    return inputs


RUNS = list(config["train"]["runs"])


def feature_inputs(wildcards):
    return {
        "checkpoint": f"results/train/{wildcards.run}/checkpoint.pt",
        "store": "results/data/pretrain.zarr",
        "table": "results/data/pretrain.parquet",
        **({"teacher": TINY_TEACHER} if TEACHER["tiny"] else {}),
    }


EVAL = config["evaluate"]
DEMO_BENCHMARKS = f"{EVAL['root']}/demo-{EVAL['demo_seed']}"


def benchmark_root(name):
    """A benchmark's own data folder; the demo's are written by the pipeline."""
    if name.startswith("demo-"):
        return f"{DEMO_BENCHMARKS}/{name}"
    return f"{EVAL['root']}/{name}"


def demo_input(wildcards):
    return [DEMO_BENCHMARKS] if wildcards.benchmark.startswith("demo-") else []


def model_specs():
    """Every compared encoder by name: trained runs' exports, the floor, external files."""
    trained = EVAL["models"]["trained"]
    unknown = sorted(set(trained) - set(RUNS))
    if unknown:
        raise WorkflowError(
            f"evaluate.models.trained: {unknown} are not in train.runs {RUNS}"
        )
    models = {
        run: {"kind": "student", "path": f"results/train/{run}/export"}
        for run in trained
    }
    if EVAL["models"]["random"]:
        if not RUNS:
            raise WorkflowError(
                "evaluate.models.random needs a train run to copy the shape of"
            )
        # The floor copies the reference run's architecture (and input spec).
        shape = EVAL["reference_model"] if EVAL["reference_model"] in RUNS else RUNS[0]
        models["random"] = {"kind": "random", "path": f"results/train/{shape}/export"}
    for name, external in EVAL["models"]["external"].items():
        if not Path(external["path"]).is_file():
            raise WorkflowError(
                f"evaluate.models.external.{name}: {external['path']} not found"
            )
        models[name] = {"kind": "torchvision", **external}
    return models


MAIN_MODELS = model_specs()
ABLATION = EVAL.get("ablation") or {}
ABLATION_RUNS = list(ABLATION.get("runs", []))
ABLATION_BENCHMARKS = list(ABLATION.get("benchmarks", []))


def ablation_models():
    """The ablation's rows: each a trained run's exported student, evaluated on the subset."""
    unknown = sorted(set(ABLATION_RUNS) - set(RUNS))
    if unknown:
        raise WorkflowError(
            f"evaluate.ablation.runs: {unknown} are not in train.runs {RUNS}"
        )
    if ABLATION_RUNS and not ABLATION_BENCHMARKS:
        raise WorkflowError("evaluate.ablation.runs needs evaluate.ablation.benchmarks")
    return {
        run: {"kind": "student", "path": f"results/train/{run}/export"}
        for run in ABLATION_RUNS
    }


MODELS = {**ablation_models(), **MAIN_MODELS}


def expected_jobs():
    """The main table's jobs: every benchmark × compared model × seed."""
    return [
        [b, m, s]
        for b in EVAL["benchmarks"]
        for m in MAIN_MODELS
        for s in EVAL["seeds"]
    ]


def ablation_jobs():
    """The ablation table's jobs: the ablation benchmarks × its runs × seeds."""
    return [
        [b, r, s]
        for b in ABLATION_BENCHMARKS
        for r in ABLATION_RUNS
        for s in EVAL["seeds"]
    ]


def evaluation_jobs():
    """Every evaluation job once (a job of both tables is run once)."""
    jobs = {tuple(job): None for job in expected_jobs() + ablation_jobs()}
    return [list(job) for job in jobs]


def evaluate_inputs(wildcards):
    model = MODELS[wildcards.model]
    inputs = {"prepared": f"results/evaluate/{wildcards.benchmark}/prepared.json"}
    if model["kind"] != "torchvision":
        inputs["model"] = model["path"]
    return inputs


def evaluate_job(wildcards):
    """The job's full description as JSON: a change to the protocol reruns the job."""
    model = dict(MODELS[wildcards.model])
    if model["kind"] != "torchvision":
        model["path"] = f"{model['path']}/backbone.safetensors"
    job = {
        "benchmark": wildcards.benchmark,
        "model": wildcards.model,
        "spec": model,
        "seed": int(wildcards.seed),
        "partition": EVAL["partition"],
        "protocol": EVAL.get("protocol", {}),
        "normalisation": EVAL.get("normalisation", "model"),
    }
    return json.dumps(job, sort_keys=True)


def benchmark_available(name):
    """Demo benchmarks are written and real ones fetched by the DAG, or already on disk."""
    return (
        name.startswith("demo-")
        or EVAL["download"]
        or Path(benchmark_root(name)).exists()
    )


def unavailable_benchmarks():
    names = dict.fromkeys(EVAL["benchmarks"] + ABLATION_BENCHMARKS)
    return [b for b in names if not benchmark_available(b)]


def available_results(wildcards):
    """Results the summary waits for; jobs of unavailable benchmarks are marked missing."""
    return [
        f"results/evaluate/{b}/{m}/seed{s}.csv"
        for b, m, s in expected_jobs()
        if benchmark_available(b)
    ]


def available_ablation_results(wildcards):
    """Results the ablation table waits for (as ``available_results``)."""
    return [
        f"results/evaluate/{b}/{r}/seed{s}.csv"
        for b, r, s in ablation_jobs()
        if benchmark_available(b)
    ]


def results_figure_inputs(wildcards):
    return {
        "summary": "results/summary.csv",
        **({"ablation": "results/ablation.csv"} if ABLATION_RUNS else {}),
    }


def runtime_jobs():
    """(rule, benchmark record) of every job but the plots, so the figure comes last."""
    data = [
        "preflight",
        "fetch_sentinel",
        "verify_sentinel",
        "select_scenes",
        "extract",
        "pair",
    ]
    data += ["merge", "stats", *(["mirror"] if DATA["mirror"] else [])]
    data += ["fetch_rgb"] if DATA["rgb"]["enabled"] else []
    jobs = [(rule, rule) for rule in data]
    jobs += [("harmonise", f"harmonise_{s}") for s in shard_ids()]
    jobs += [("tiny_teacher", "tiny_teacher")] if TEACHER["tiny"] else []
    for variant in CACHE_VARIANTS:
        jobs += [
            ("cache_teacher", f"cache_teacher_{variant}_{p}") for p in cache_part_ids()
        ]
        jobs.append(("finalise_teacher_cache", f"finalise_teacher_cache_{variant}"))
    jobs += [(rule, f"{rule}_{run}") for run in RUNS for rule in ("distill", "export")]
    names = dict.fromkeys(EVAL["benchmarks"] + ABLATION_BENCHMARKS)
    available = [b for b in names if benchmark_available(b)]
    if any(b.startswith("demo-") for b in available):
        jobs.append(("demo_benchmarks", "demo_benchmarks"))
    jobs += [("prepare_benchmark", f"prepare_{b}") for b in available]
    jobs += [
        ("evaluate", f"evaluate_{b}_{m}_seed{s}")
        for b, m, s in evaluation_jobs()
        if benchmark_available(b)
    ]
    jobs.append(("summarise", "summarise"))
    if ABLATION_RUNS:
        jobs.append(("ablation", "ablation"))
    return [(rule, f"results/benchmarks/{name}.tsv") for rule, name in jobs]


def runtime_records(wildcards):
    return [path for _, path in runtime_jobs()]


def runtime_args():
    return [f"{rule}={path}" for rule, path in runtime_jobs()]


def all_targets():
    return [
        "results/data/counts.json",
        *expand("results/train/{run}/export", run=RUNS),
        "results/report/training.png",
        "results/report/data_counts.png",
        "results/report/coreg.png",
        "results/report/runtimes.png",
        *expand("results/report/features_{run}.png", run=RUNS),
        *expand("results/report/views_{run}.png", run=RUNS),
        "results/summary.csv",
        "results/report/results.png",
        *(["results/ablation.csv"] if ABLATION_RUNS else []),
        *[f"results/evaluate/{b}/{m}/seed{s}.csv" for b, m, s in evaluation_jobs()],
    ]
