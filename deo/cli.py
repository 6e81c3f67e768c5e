"""``deo <stage>``: one command per pipeline stage, each called by one Snakemake rule.

Rules pass the config sections a stage reads as JSON (``--data``), so Snakemake's params
trigger reruns a stage exactly when one of those sections changes.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from deo import __version__
from deo.config import DataConfig, from_dict
from deo.errors import ConfigError, DeoError

log = logging.getLogger("deo")
PROFILE = Path(__file__).resolve().parents[1] / "workflow" / "profiles" / "slurm"
"""The Slurm profile of the checkout this package is installed from (editable install)."""


def data_config(text: str, *required: str) -> DataConfig:
    """Parse a data-section subset, insisting that the sections the stage reads are present."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--data is not valid JSON: {e}") from e
    missing = [k for k in required if k not in raw]
    if missing:
        raise ConfigError(f"--data lacks section(s) {missing} that this stage reads")
    return from_dict(DataConfig, raw, "data")


def _mirror(a: argparse.Namespace) -> None:
    from deo.data.mirror import write_mirror

    cfg = data_config(a.data, "mirror", "sentinel", "rgb")
    if cfg.mirror is None:
        raise ConfigError("data.mirror is null: there is no synthetic mirror to write")
    s = cfg.sentinel
    write_mirror(
        cfg.mirror,
        a.out,
        csvs=s.csvs,
        archive=s.archive,
        archive_prefix=s.archive_prefix,
        folders=s.folders,
        rgb_mappings=cfg.rgb.mappings,
    )


def _fetch_sentinel(a: argparse.Namespace) -> None:
    from deo.data.stages import fetch_files

    cfg = data_config(a.data, "sentinel", "fetch")
    names = [cfg.sentinel.archive, *cfg.sentinel.csvs.values()]
    fetch_files(a.base_url, names, a.dest, a.record, cfg=cfg)


def _preflight(a: argparse.Namespace) -> None:
    from deo.data.preflight import preflight

    try:
        settings = json.loads(a.settings)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--settings is not valid JSON: {e}") from e
    data = json.dumps({**settings, **json.loads(a.data)})
    cfg = data_config(data, "sentinel", "rgb", "harmonise", "selection", "preflight")
    rgb_url = a.rgb_url if cfg.rgb.enabled else None
    preflight(cfg, a.sentinel_url, rgb_url, a.out_json, a.out_md)


def _verify(a: argparse.Namespace) -> None:
    from deo.data.fetch import verify_manifest

    problems = verify_manifest(a.manifest, rehash=a.rehash)
    if problems:
        raise DeoError(
            f"{a.manifest}: {len(problems)} file(s) fail verification: " + "; ".join(problems)
        )
    a.out.write_text(json.dumps({"manifest": str(a.manifest), "verified": True}))


def _select(a: argparse.Namespace) -> None:
    from deo.data.stages import select

    cfg = data_config(a.data, "sentinel", "selection")
    select(a.csv_dir, cfg.sentinel, cfg.selection, a.out)


def _extract(a: argparse.Namespace) -> None:
    from deo.data.stages import extract

    cfg = data_config(a.data, "sentinel")
    extract(a.archive, a.selection, cfg.sentinel.archive_prefix, a.dest, a.record, a.skipped)


def _fetch_rgb(a: argparse.Namespace) -> None:
    from deo.data.stages import fetch_partners

    cfg = data_config(a.data, "fetch", "rgb")
    fetch_partners(a.selection, a.base_url, a.dest, a.record, cfg=cfg)


def _pair(a: argparse.Namespace) -> None:
    from deo.data.stages import pair

    cfg = data_config(a.data, "sentinel", "rgb")
    prefix = cfg.sentinel.archive_prefix
    pair(
        a.selection,
        a.sentinel_root,
        a.rgb_root,
        a.rgb_record,
        a.extract_skipped,
        prefix,
        a.out,
        a.rejects,
        a.counts,
        rgb_mappings=cfg.rgb.mappings,
    )


def _harmonise(a: argparse.Namespace) -> None:
    from deo.data.stages import harmonise_shard

    cfg = data_config(a.data, "harmonise", "rgb")
    harmonise_shard(
        a.pairs, a.shard, cfg.harmonise.shards, cfg.harmonise, cfg.rgb.enabled, a.out, a.rejects
    )


def _merge(a: argparse.Namespace) -> None:
    from deo.data.stages import merge

    cfg = data_config(a.data)
    merge(a.shards, a.reject_tables, a.pairs, cfg, a.out_store, a.out_table, a.rejects, a.counts)


def _stats(a: argparse.Namespace) -> None:
    import pandas as pd

    from deo.data.stats import band_stats, write_stats

    stats = band_stats(a.store, pd.read_parquet(a.table), split=a.split)
    write_stats(a.store, stats, a.out)


def _train(a: argparse.Namespace) -> None:
    import os

    from deo.train.config import parse_teacher, parse_train
    from deo.train.loop import Preempted, train

    _launch_ranks(a)
    cfg, teacher = parse_train(json.loads(a.train)), parse_teacher(json.loads(a.teacher))
    try:
        train(
            cfg,
            teacher,
            a.store,
            a.table,
            a.out,
            device=a.device,
            max_steps=a.max_steps,
            teacher_cache=a.teacher_cache,
        )
    except Preempted as e:
        log.warning("%s", e)
        raise SystemExit(128 + e.signum) from e
    if a.final_checkpoint and int(os.environ.get("RANK", "0")) == 0:
        from deo.train.finish import publish_run

        publish_run(a.out, a.final_checkpoint, a.final_metrics)


def _views(a: argparse.Namespace) -> None:
    """The first training batches as the model sees them (``deo.report.views``)."""
    from deo.cache.spec import split_teacher_section
    from deo.report.views import dump_views
    from deo.train.config import parse_teacher, parse_train, run_config

    if a.train is not None:
        train, teacher = json.loads(a.train), json.loads(a.teacher or "null")
    else:
        from deo.workflow import resolve_config

        if a.run is None:
            raise ConfigError("deo views: --run NAME is needed with --configfile")
        config = resolve_config(a.configfile)
        train, teacher = run_config(config["train"], a.run), config["teacher"]
    cache = None
    if a.teacher_cache is not None:
        if teacher is None:
            raise ConfigError("deo views: --teacher-cache needs --teacher (or --configfile)")
        cache = (a.teacher_cache, parse_teacher(split_teacher_section(teacher)[0]))
    dump_views(parse_train(train), a.store, a.table, a.out, a.batches, a.device, cache)


def _config(a: argparse.Namespace) -> None:
    """Print the resolved config as the DAG's jobs see it, with what each run builds."""
    from snakemake.cli import parse_config

    from deo.describe import describe
    from deo.workflow import resolve_config

    config = resolve_config(a.configfile, parse_config(a.config), root=a.directory)
    doc = describe(config, a.run)
    if a.json:
        print(json.dumps(doc, indent=2))
        return
    import yaml

    print(yaml.safe_dump(doc, sort_keys=False), end="")


def _export(a: argparse.Namespace) -> None:
    from deo.train.finish import export_run

    export_run(a.checkpoint, a.out, a.stats)


def _tiny_teacher(a: argparse.Namespace) -> None:
    from deo.models.teacher import build_tiny_teacher_weights
    from deo.train.config import parse_teacher

    build_tiny_teacher_weights(a.out, parse_teacher(json.loads(a.teacher)))


def _cache_teacher(a: argparse.Namespace) -> None:
    from deo.cache.build import build_part
    from deo.cache.spec import CacheConfig, GlobalViews
    from deo.train.config import parse_teacher

    views = from_dict(GlobalViews, json.loads(a.views), "global views")
    cache = from_dict(CacheConfig, json.loads(a.cache), "teacher.cache")
    teacher = parse_teacher(json.loads(a.teacher))
    build_part(a.store, a.table, teacher, views, cache, a.part, a.work, a.out, device=a.device)


def _finalise_teacher_cache(a: argparse.Namespace) -> None:
    from deo.cache.build import finalise

    finalise(a.parts, a.out)


def _launch_ranks(a: argparse.Namespace) -> None:
    """Become torchrun (or one srun launcher per node) when the resources ask for more ranks.

    The process is replaced (exec), so the scheduler's signals and the exit status reach
    the ranks and the launcher directly; it returns only where this process trains itself.
    """
    import os

    from deo.train.launch import Resources, plan

    res = Resources(a.gpus, a.nodes, a.cpus_per_node, a.nproc_per_node)
    launch = plan(sys.argv[1:], res, os.environ)
    if launch is not None:
        log.info("launching: %s", " ".join(launch.argv))
        sys.stderr.flush()
        os.execvpe(launch.argv[0], launch.argv, {**os.environ, **launch.env})


def _install_profile(a: argparse.Namespace) -> None:
    """Link the workflow's Slurm profile where Snakemake looks a bare ``--profile`` name up."""
    source = a.source.resolve()
    if not (source / "config.yaml").is_file():
        raise DeoError(f"{source} holds no config.yaml; pass --source workflow/profiles/slurm")
    dest = (a.dest or _default_profile_dest()).expanduser()
    if dest.is_symlink() and dest.resolve() == source:
        log.info("%s already links to %s", dest, source)
        return
    if dest.exists() or dest.is_symlink():
        if not a.force:
            raise DeoError(f"{dest} exists and is not a link to {source}; --force replaces it")
        if dest.is_dir() and not dest.is_symlink():
            import shutil

            shutil.rmtree(dest)
        else:
            dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.symlink_to(source, target_is_directory=True)
    log.info("linked %s -> %s: `snakemake --profile %s` now finds it", dest, source, dest.name)


def _default_profile_dest() -> Path:
    """Snakemake's user profile folder (``~/.config/snakemake`` on Linux, XDG respected)."""
    from platformdirs import user_config_dir

    return Path(user_config_dir("snakemake", "snakemake")) / "slurm"


def _named_paths(kind: str, items: list[str], form: str) -> list[tuple[str, Path]]:
    """``NAME=path`` arguments as pairs, in order; anything else fails naming the argument."""
    pairs = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"deo plot {kind}: {item!r} is not {form}")
        pairs.append((name, Path(path)))
    return pairs


def _plot(a: argparse.Namespace) -> None:
    from deo.report import plots

    if a.kind == "training":
        plots.training_curves(dict(_named_paths(a.kind, a.inputs, "RUN=metrics.csv")), a.out)
    elif a.kind == "data":
        plots.data_counts(Path(a.inputs[0]), a.out)
    elif a.kind == "coreg":
        plots.coreg_scores(Path(a.inputs[0]), a.min_score, a.out)
    elif a.kind == "views":
        from deo.report.views import plot_views

        plot_views(Path(a.inputs[0]), a.out)
    else:
        by_rule: dict[str, list[Path]] = {}
        for rule, path in _named_paths(a.kind, a.inputs, "RULE=benchmark.tsv"):
            by_rule.setdefault(rule, []).append(path)
        plots.rule_runtimes(by_rule, a.out)


def _plot_features(a: argparse.Namespace) -> None:
    from deo.report.features import feature_maps
    from deo.train.config import parse_teacher

    teacher = parse_teacher(json.loads(a.teacher))
    feature_maps(a.checkpoint, teacher, a.store, a.table, a.out, n_samples=a.samples)


def _demo_benchmarks(a: argparse.Namespace) -> None:
    from deo.evaluation.stage import write_demo

    write_demo(a.out, a.seed)


def _prepare_benchmark(a: argparse.Namespace) -> None:
    from deo.evaluation.stage import prepare

    prepare(a.name, a.root, a.download, a.record)


def _evaluate(a: argparse.Namespace) -> None:
    from deo.evaluation.stage import evaluate, parse_job

    evaluate(parse_job(a.job), a.root, a.out)


def _summarise(a: argparse.Namespace) -> None:
    from deo.evaluation.stage import summarise_results

    expected = [tuple(job) for job in json.loads(a.expected)]
    summarise_results(
        expected, a.results, a.paper, a.reference, a.out_csv, a.out_md, a.out_html, a.unavailable
    )


def _ablation(a: argparse.Namespace) -> None:
    from deo.evaluation.stage import ablation_results

    expected = [tuple(job) for job in json.loads(a.expected)]
    ablation_results(
        expected, a.results, a.runs, a.paper, a.out_csv, a.out_md, a.out_html, a.unavailable
    )


def _plot_results(a: argparse.Namespace) -> None:
    from deo.report.results import plot_results

    plot_results(a.summary, a.ablation, a.models, a.out)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deo", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"deo {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def cmd(
        name: str, fn: Callable[[argparse.Namespace], None], help: str
    ) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help, description=help)
        s.set_defaults(fn=fn)
        return s

    def data_arg(s: argparse.ArgumentParser) -> None:
        s.add_argument("--data", required=True, help="the config's data section (JSON)")

    s = cmd("mirror", _mirror, "write a synthetic mirror of the fMoW hosts in the real formats")
    data_arg(s)
    s.add_argument("--out", type=Path, required=True)

    s = cmd("fetch-sentinel", _fetch_sentinel, "fetch the fMoW-Sentinel archive and split CSVs")
    data_arg(s)
    s.add_argument("--base-url", required=True)
    s.add_argument("--dest", type=Path, required=True, help="persistent download directory")
    s.add_argument("--record", type=Path, required=True, help="CSV of what was fetched")

    s = cmd("preflight", _preflight, "check the hosts' formats with ranged reads: go or no-go")
    data_arg(s)
    s.add_argument(
        "--settings",
        default="{}",
        help="further data sections (JSON) for the estimates: harmonise, selection, store",
    )
    s.add_argument("--sentinel-url", required=True, help="fMoW-Sentinel base URL")
    s.add_argument("--rgb-url", required=True, help="fMoW-RGB base URL")
    s.add_argument("--out-json", type=Path, required=True)
    s.add_argument("--out-md", type=Path, required=True)

    s = cmd("verify", _verify, "check downloaded files against their recorded checksums")
    s.add_argument("--manifest", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument(
        "--rehash",
        action="store_true",
        help="re-hash files whose size and mtime match the manifest too (data.fetch.rehash)",
    )

    s = cmd("select", _select, "choose the scenes to use (seeded) from the split CSVs")
    data_arg(s)
    s.add_argument("--csv-dir", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)

    s = cmd("extract", _extract, "extract the selected scenes from the archive")
    data_arg(s)
    for name in ("--archive", "--selection", "--dest", "--record", "--skipped"):
        s.add_argument(name, type=Path, required=True)

    s = cmd("fetch-rgb", _fetch_rgb, "fetch the fMoW-RGB partners of the selected scenes")
    data_arg(s)
    s.add_argument("--selection", type=Path, required=True)
    s.add_argument("--base-url", required=True)
    s.add_argument("--dest", type=Path, required=True)
    s.add_argument("--record", type=Path, required=True)

    s = cmd("pair", _pair, "join each scene with its RGB partner")
    data_arg(s)
    for name in (
        "--selection",
        "--sentinel-root",
        "--extract-skipped",
        "--out",
        "--rejects",
        "--counts",
    ):
        s.add_argument(name, type=Path, required=True)
    s.add_argument("--rgb-root", type=Path, help="omit for an MS-only store")
    s.add_argument("--rgb-record", type=Path, help="the fetch-rgb record")

    s = cmd("harmonise", _harmonise, "harmonise one shard of scenes onto the common grid")
    data_arg(s)
    s.add_argument("--pairs", type=Path, required=True)
    s.add_argument("--shard", type=int, required=True)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--rejects", type=Path, required=True)

    s = cmd("merge", _merge, "assemble the shard stores into the pre-training store")
    data_arg(s)
    s.add_argument("--shards", type=Path, nargs="+", required=True)
    s.add_argument("--reject-tables", type=Path, nargs="+", required=True)
    for name in ("--pairs", "--out-store", "--out-table", "--rejects", "--counts"):
        s.add_argument(name, type=Path, required=True)

    s = cmd("train", _train, "dual-teacher distillation of the student (resumes a run)")
    s.add_argument("--train", required=True, help="the run's resolved train section (JSON)")
    s.add_argument("--teacher", required=True, help="the teacher section (JSON)")
    for name in ("--store", "--table", "--out"):
        s.add_argument(name, type=Path, required=True)
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.add_argument("--gpus", type=int, default=0, help="GPUs of the whole job (Slurm's --gpus)")
    s.add_argument("--nodes", type=int, default=1, help="nodes: one torchrun per node (Slurm)")
    s.add_argument("--cpus-per-node", type=int, default=1, help="CPUs of each node's launcher")
    s.add_argument("--nproc-per-node", type=int, help="ranks per node (default: one per GPU)")
    s.add_argument("--max-steps", type=int, help="stop after this many steps in all (tests)")
    s.add_argument("--final-checkpoint", type=Path, help="where the finished run's checkpoint goes")
    s.add_argument("--final-metrics", type=Path, help="per-step metrics of the finished run, CSV")
    s.add_argument("--teacher-cache", type=Path, help="replay this cache (teacher.mode: cached)")

    s = cmd("views", _views, "the first training batches' views, as the model sees them")
    which = s.add_mutually_exclusive_group(required=True)
    which.add_argument("--configfile", nargs="+", help="config files, as Snakemake's (with --run)")
    which.add_argument("--train", help="a run's resolved train section (JSON), as deo train's")
    s.add_argument("--teacher", help="the teacher section (JSON), with --train and a cache")
    s.add_argument("--teacher-cache", type=Path, help="a cached run's cache: its global views")
    s.add_argument("--run", help="the train run whose views to write (with --configfile)")
    s.add_argument("--store", type=Path, default=Path("results/data/pretrain.zarr"))
    s.add_argument("--table", type=Path, default=Path("results/data/pretrain.parquet"))
    s.add_argument("--out", type=Path, required=True, help="folder for batch_NNNN.npz")
    s.add_argument("--batches", type=int, default=1, help="how many batches, from the first")
    s.add_argument("--device", default="cpu", help="where the views are rendered")

    s = cmd("config", _config, "the resolved config as the jobs see it, and what it builds")
    s.add_argument(
        "--configfile",
        nargs="+",
        default=[],
        help="as Snakemake's: these files, merged in order, replace the embedded default",
    )
    s.add_argument("--config", nargs="+", default=[], help="KEY=VALUE overrides, as Snakemake's")
    s.add_argument("--run", help="describe this train run only")
    s.add_argument("--json", action="store_true", help="JSON instead of YAML")
    s.add_argument(
        "--directory", type=Path, default=Path("."), help="the workflow root (default: here)"
    )

    s = cmd("cache-teacher", _cache_teacher, "one part of the teacher-target cache (resumes)")
    s.add_argument("--teacher", required=True, help="the teacher section (JSON)")
    s.add_argument("--views", required=True, help="the global-view settings to cache (JSON)")
    s.add_argument("--cache", required=True, help="K and teacher.cache (JSON)")
    for name in ("--store", "--table", "--work", "--out"):
        s.add_argument(name, type=Path, required=True)
    s.add_argument("--part", type=int, required=True, help="this job's part, 0..shards-1")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    s = cmd("finalise-teacher-cache", _finalise_teacher_cache, "assemble the cache's parts")
    s.add_argument("--parts", type=Path, nargs="+", required=True, help="the parts' records")
    s.add_argument("--out", type=Path, required=True)

    s = cmd("export", _export, "write the student backbone (and torchgeo's Swin layout)")
    s.add_argument("--checkpoint", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--stats", type=Path, required=True, help="the store's stats.json")

    s = cmd("tiny-teacher", _tiny_teacher, "write the tiny random-weight teacher of the demo")
    s.add_argument("--teacher", required=True, help="the teacher section (JSON)")
    s.add_argument("--out", type=Path, required=True)

    s = cmd("plot", _plot, "a report figure from stage records")
    s.add_argument("kind", choices=["training", "data", "coreg", "runtimes", "views"])
    s.add_argument(
        "inputs",
        nargs="+",
        help="training: RUN=metrics.csv …; data: counts.json; coreg: pretrain.parquet; "
        "runtimes: RULE=benchmark.tsv …; views: a batch_NNNN.npz of deo views",
    )
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--min-score", type=float, default=0.3, help="coreg: the threshold drawn")

    s = cmd("plot-features", _plot_features, "PCA-to-RGB maps of student and teacher features")
    s.add_argument("--teacher", required=True, help="the teacher section (JSON)")
    for name in ("--checkpoint", "--store", "--table", "--out"):
        s.add_argument(name, type=Path, required=True)
    s.add_argument("--samples", type=int, default=4)

    s = cmd("install-profile", _install_profile, "make `snakemake --profile slurm` find ours")
    s.add_argument("--source", type=Path, default=PROFILE, help="the profile folder to link")
    s.add_argument("--dest", type=Path, help="default: Snakemake's user profiles folder/slurm")
    s.add_argument("--force", action="store_true", help="replace what is at --dest")

    s = cmd("demo-benchmarks", _demo_benchmarks, "write the demo's benchmarks in real formats")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--seed", type=int, default=0)

    s = cmd("prepare-benchmark", _prepare_benchmark, "download and ready one benchmark's data")
    s.add_argument("--name", required=True)
    s.add_argument("--root", type=Path, required=True, help="the benchmark's data folder")
    s.add_argument("--download", action="store_true", help="fetch it when absent")
    s.add_argument("--record", type=Path, required=True)

    s = cmd("evaluate", _evaluate, "evaluate one model on one benchmark for one seed")
    s.add_argument("--job", required=True, help="benchmark, model, seed, protocol (JSON)")
    s.add_argument("--root", type=Path, required=True, help="the benchmark's data folder")
    s.add_argument("--out", type=Path, required=True, help="results CSV")

    s = cmd("summarise", _summarise, "join the results into one table beside the paper's")
    s.add_argument("--expected", required=True, help="[[benchmark, model, seed], …] (JSON)")
    s.add_argument("--results", type=Path, nargs="*", default=[])
    s.add_argument("--paper", type=Path, required=True)
    s.add_argument("--reference", required=True, help="our model compared with the paper's DEO")
    s.add_argument("--unavailable", nargs="*", default=[], help="benchmarks without data")
    for name in ("--out-csv", "--out-md", "--out-html"):
        s.add_argument(name, type=Path, required=True)

    s = cmd("ablation", _ablation, "the ablation table: averages per run beside the paper's")
    s.add_argument("--expected", required=True, help="[[benchmark, run, seed], …] (JSON)")
    s.add_argument("--results", type=Path, nargs="*", default=[])
    s.add_argument("--runs", nargs="+", required=True, help="the ablation's runs, row order")
    s.add_argument("--paper", type=Path, required=True, help="config/paper_ablation.csv")
    s.add_argument("--unavailable", nargs="*", default=[], help="benchmarks without data")
    for name in ("--out-csv", "--out-md", "--out-html"):
        s.add_argument(name, type=Path, required=True)

    s = cmd("plot-results", _plot_results, "figure: results vs the paper, and the ablation")
    s.add_argument("--summary", type=Path, required=True, help="results/summary.csv")
    s.add_argument("--ablation", type=Path, default=None, help="results/ablation.csv")
    s.add_argument("--models", nargs="+", required=True, help="models shown, in order")
    s.add_argument("--out", type=Path, required=True)

    s = cmd("stats", _stats, "per-band mean/std over a split, into the store and a JSON")
    for name in ("--store", "--table", "--out"):
        s.add_argument(name, type=Path, required=True)
    s.add_argument("--split", default="train")
    return p


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """Turn a scheduler's SIGTERM into an exception, so partial work is flushed on the way out."""
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # training installs its own handler
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        args.fn(args)
    except DeoError as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
