"""Kills, signals and changed settings: whatever is interrupted, a rerun ends where an
uninterrupted run does.

Two levels. (1) One harmonise job in a subprocess that sends itself SIGKILL at a chosen call
(before its partial shard records its settings, at a table flush, while saving a reject, between
scenes), resumed, against the uninterrupted job. (2) The embedded-default DAG through Snakemake
(``teacher.mode: cached``, so the teacher cache is built), its whole process group killed with
SIGKILL at seeded random points inside harmonise, merge, cache_teacher and distill, then rerun
with a plain ``snakemake``: store, rejects, cache, checkpoint and metrics must equal one
uninterrupted reference run's. SIGTERM followed by a settings change must give the store of a
clean run with the new settings. By default one point per stage (CI's budget); ``DEO_FAULTS=full``
runs ``FULL_POINTS`` seeded points per stage.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
import zarr

from deo.config import DataConfig, from_dict, to_dict
from deo.data import stages
from deo.data.store import merge_shards

ROOT = Path(__file__).parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

FULL = os.environ.get("DEO_FAULTS", "") == "full"
FULL_POINTS = 4
SEED = 13
TARGETS = ("results/train/deo/checkpoint.pt", "results/train/deo/metrics.csv")
VARIANT = "partner-aug"


def _env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def _command(*args: str) -> list[str]:
    # targets first: --configfile takes every value after it
    return [sys.executable, "-m", "snakemake", *TARGETS, "--cores", "2", *args]


def snakemake(workdir: Path, *args: str) -> str:
    done = subprocess.run(
        _command("--configfile", "faults.yaml", *args),
        cwd=workdir,
        capture_output=True,
        text=True,
        env=_env(),
    )
    if done.returncode != 0:
        pytest.fail(f"snakemake {args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def interrupt(workdir: Path, job: str, log: str, delay: float, sig: int, configfile: str) -> bool:
    """Run the DAG in its own process group; ``delay`` s after ``job`` started (its ``log``
    appeared), send ``sig`` to the whole group. True when that job was still running then."""
    benchmark = workdir / f"results/benchmarks/{job}.tsv"
    benchmark.unlink(missing_ok=True)
    with open(workdir / "interrupted.log", "w") as out:
        proc = subprocess.Popen(
            _command("--configfile", configfile),
            cwd=workdir,
            env=_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 900
        while not (workdir / log).exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                text = (workdir / "interrupted.log").read_text()[-3000:]
                pytest.fail(f"the DAG ended before {log} was written:\n{text}")
            time.sleep(0.02)
        time.sleep(delay)
        running = not (workdir / benchmark).exists()  # Snakemake writes it when the job ends
        os.killpg(proc.pid, sig)
        proc.wait(timeout=120)
    finally:
        _wait_group_gone(proc.pid)
    return running


def _wait_group_gone(pgid: int) -> None:
    """After SIGTERM the jobs take a moment to exit; anything left after 60 s is killed."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.killpg(pgid, signal.SIGKILL)


def copy_workflow(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "Snakefile", dest)
    for folder in ("workflow", "config", "envs", "profiles"):
        shutil.copytree(ROOT / folder, dest / folder)
    cfg = yaml.safe_load((dest / "config/config.yaml").read_text())
    cfg["teacher"]["mode"] = "cached"
    (dest / "faults.yaml").write_text(yaml.safe_dump(cfg))
    return dest


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted run of the DAG up to training, the yardstick of every case."""
    workdir = copy_workflow(tmp_path_factory.mktemp("faults") / "reference")
    snakemake(workdir)
    return workdir


def runtime(workdir: Path, job: str) -> float:
    """Wall time of one job in the reference run, from its benchmark record."""
    return float(pd.read_csv(workdir / f"results/benchmarks/{job}.tsv", sep="\t")["s"].iloc[0])


# What a rerun of each stage needs removed (Snakemake then reruns it and everything below it),
# and the job whose start and duration place the kill.
STAGES = {
    "harmonise": (
        [
            "results/data/pretrain.zarr",
            "results/data/pretrain.parquet",
            "results/data/rejects.csv",
            "results/data/counts.json",
        ],
        "harmonise_0",
        "logs/data/harmonise_0.log",
    ),
    "merge": (
        ["results/data/pretrain.zarr", "results/data/pretrain.parquet"],
        "merge",
        "logs/data/merge.log",
    ),
    "cache_teacher": (
        [f"results/teacher/{VARIANT}.zarr"],
        f"cache_teacher_{VARIANT}_0",
        f"logs/teacher/cache_{VARIANT}_0.log",
    ),
    "distill": (
        ["results/train/deo/checkpoint.pt", "results/train/deo/metrics.csv", "results/train/deo"],
        "distill_deo",
        "logs/train/distill_deo.log",
    ),
}


def kill_points() -> list[tuple[str, float]]:
    """(stage, fraction of its reference runtime): seeded, one per stage unless DEO_FAULTS=full."""
    rng = random.Random(SEED)
    per_stage = FULL_POINTS if FULL else 1
    return [
        (stage, round(rng.uniform(0.15, 0.85), 3)) for stage in STAGES for _ in range(per_stage)
    ]


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@pytest.mark.parametrize(("stage", "fraction"), kill_points())
def test_kill_9_then_rerun_gives_the_uninterrupted_outputs(
    reference: Path, tmp_path: Path, stage: str, fraction: float
) -> None:
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir, symlinks=True)
    removed, job, log = STAGES[stage]
    shutil.rmtree(workdir / "logs")
    for path in removed:
        _remove(workdir / path)
    delay = fraction * runtime(reference, job)
    running = interrupt(workdir, job, log, delay, signal.SIGKILL, "faults.yaml")
    if not running:
        pytest.fail(f"{job} finished within {delay:.1f} s: the kill point is outside the stage")

    out = snakemake(workdir)

    assert "IncompleteFilesException" not in out and "LockException" not in out
    assert_same_outputs(reference, workdir)


def assert_same_outputs(reference: Path, workdir: Path) -> None:
    data = "results/data"
    assert_same_group(reference / data / "pretrain.zarr", workdir / data / "pretrain.zarr")
    pd.testing.assert_frame_equal(
        pd.read_parquet(reference / data / "pretrain.parquet"),
        pd.read_parquet(workdir / data / "pretrain.parquet"),
    )
    for name in ("rejects.csv", "counts.json", "stats.json"):
        assert (reference / data / name).read_text() == (workdir / data / name).read_text(), name
    cache = f"results/teacher/{VARIANT}.zarr"
    assert_same_group(reference / cache, workdir / cache)
    assert not list((workdir / "results/teacher").glob(f"{VARIANT}/work-*")), "parts left over"
    train = "results/train/deo"
    expected = torch.load(reference / train / "checkpoint.pt", weights_only=True)
    found = torch.load(workdir / train / "checkpoint.pt", weights_only=True)
    assert_same_tree(expected, found, "checkpoint")
    metrics = [pd.read_csv(w / train / "metrics.csv") for w in (reference, workdir)]
    timing = [c for c in metrics[0] if "time" in c or "per_s" in c or "throughput" in c]
    pd.testing.assert_frame_equal(*(m.drop(columns=timing) for m in metrics))


def assert_same_group(expected: Path, found: Path) -> None:
    a, b = (zarr.open_group(p, mode="r", zarr_format=3) for p in (expected, found))
    assert dict(a.attrs) == dict(b.attrs), expected.name
    arrays_a = {k: v for k, v in a.members(max_depth=None) if isinstance(v, zarr.Array)}
    arrays_b = {k: v for k, v in b.members(max_depth=None) if isinstance(v, zarr.Array)}
    assert sorted(arrays_a) == sorted(arrays_b), expected.name
    for name, array in arrays_a.items():
        np.testing.assert_array_equal(array[:], arrays_b[name][:], err_msg=f"{expected}/{name}")


def assert_same_tree(expected: object, found: object, where: str) -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(found, torch.Tensor) and torch.equal(expected, found), where
    elif isinstance(expected, dict):
        assert isinstance(found, dict) and sorted(map(str, expected)) == sorted(map(str, found))
        for key, value in expected.items():
            assert_same_tree(value, found[key], f"{where}.{key}")
    elif isinstance(expected, list | tuple):
        assert isinstance(found, list | tuple) and len(expected) == len(found), where
        for i, (x, y) in enumerate(zip(expected, found, strict=True)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert expected == found or (expected != expected and found != found), where


# ---- one harmonise job, killed at chosen calls ------------------------------------------------

KILLED_JOB = textwrap.dedent(
    """
    import functools, json, os, signal, sys
    from pathlib import Path
    from deo.config import DataConfig, from_dict
    from deo.data import stages, store

    where, nth, data, out = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
    module, name = where.split(".")
    target = {"stages": stages, "store": store}[module]
    original, calls = getattr(target, name), []

    def killing(*args, **kwargs):
        calls.append(1)
        if len(calls) == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(target, name, killing)
    # flush the table every 2 samples, so that a kill leaves finished samples to resume from
    stages.ShardWriter = functools.partial(store.ShardWriter, flush_every=2)
    cfg = from_dict(DataConfig, data)
    stages.harmonise_shard(
        Path("results/data/pairs.parquet"), 0, 1, cfg.harmonise, True, Path(out), Path(out + ".csv")
    )
    """
)


def data_config(workdir: Path, **harmonise: object) -> DataConfig:
    data = yaml.safe_load((workdir / "faults.yaml").read_text())["data"]
    data["harmonise"].update(harmonise)
    return from_dict(DataConfig, data)


def harmonise(cfg: DataConfig, out: Path) -> None:
    pairs = Path("results/data/pairs.parquet")
    stages.harmonise_shard(pairs, 0, 1, cfg.harmonise, True, out, Path(f"{out}.csv"))


def killed_harmonise(cfg: DataConfig, out: Path, where: str, nth: int) -> None:
    args = [where, str(nth), json.dumps(to_dict(cfg)), str(out)]
    done = subprocess.run(
        [sys.executable, "-c", KILLED_JOB, *args], capture_output=True, text=True, env=_env()
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert not out.exists() and out.with_name(out.name + ".partial").exists()


def shard_outputs(out: Path) -> tuple[dict[str, np.ndarray], pd.DataFrame, str]:
    store, table = out.with_name("merged.zarr"), out.with_name("merged.parquet")
    merge_shards([out], store, table, samples_per_shard=8, clevel=1, attrs={})
    group = zarr.open_group(store, mode="r")
    arrays = {name: group[name][:] for name in group.array_keys()}
    return arrays, pd.read_parquet(table), Path(f"{out}.csv").read_text()


def assert_same_shard(expected: Path, found: Path) -> None:
    (arrays_a, table_a, rejects_a), (arrays_b, table_b, rejects_b) = map(
        shard_outputs, (expected, found)
    )
    assert sorted(arrays_a) == sorted(arrays_b)
    for name in arrays_a:
        np.testing.assert_array_equal(arrays_a[name], arrays_b[name], err_msg=name)
    pd.testing.assert_frame_equal(table_a, table_b)
    assert rejects_a == rejects_b


@pytest.fixture(scope="module")
def clean_shard(reference: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every scene of the reference run in one uninterrupted harmonise job."""
    out = tmp_path_factory.mktemp("clean") / "0.zarr"
    cwd = Path.cwd()
    os.chdir(reference)
    try:
        harmonise(data_config(reference), out)
    finally:
        os.chdir(cwd)
    return out


# (call that kills, which call): before the partial shard records its settings (the arrays
# exist, partial.json does not); at a table flush; while a reject is saved; between scenes.
HARMONISE_KILLS = [
    ("store.write_json_atomic", 1),
    ("store._write_parquet_atomic", 4),
    ("stages.write_json_atomic", 2),
    ("stages.read_s2", 37),
]


@pytest.mark.parametrize(("where", "nth"), HARMONISE_KILLS)
def test_killed_harmonise_job_resumes_to_the_clean_shard(
    reference: Path,
    clean_shard: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
    nth: int,
) -> None:
    monkeypatch.chdir(reference)
    out = tmp_path / "0.zarr"
    cfg = data_config(reference)
    killed_harmonise(cfg, out, where, nth)
    harmonise(cfg, out)
    assert not out.with_name("0.zarr.partial").exists()
    assert_same_shard(clean_shard, out)
    rejects = pd.read_csv(f"{out}.csv")
    assert rejects["reason"].str.contains("corrupt or truncated JPEG").any()
    assert rejects["reason"].str.contains("unreadable JSON").any()


def test_partial_shard_of_other_settings_is_started_over(
    reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    monkeypatch.chdir(reference)
    old = data_config(reference)
    new = data_config(reference, resampling={"10": "nearest", "20": "nearest", "60": "nearest"})
    clean = tmp_path / "clean" / "0.zarr"
    clean.parent.mkdir()
    harmonise(new, clean)
    out = tmp_path / "resumed" / "0.zarr"
    out.parent.mkdir()
    killed_harmonise(old, out, "stages.read_s2", 40)

    with caplog.at_level("WARNING", logger="deo.data.store"):
        harmonise(new, out)

    assert "other settings" in caplog.text
    assert_same_shard(clean, out)
