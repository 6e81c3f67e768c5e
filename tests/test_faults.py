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
runs ``FULL_POINTS`` seeded points per stage. (3) The teacher cache's assembly killed while it
links the parts and while it removes them; and Snakemake's locks left by a killed run. The
download faults (a host that swaps the file between requests) are in tests/test_fetch.py.
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
from fakes import TINY_TEACHER, TINY_TRAIN, write_store

from deo.cache.build import build_part, finalise
from deo.cache.spec import CacheConfig, GlobalViews
from deo.config import DataConfig, from_dict, to_dict
from deo.data import stages
from deo.data.store import merge_shards
from deo.train.config import parse_teacher, parse_train
from deo.workflow import clear_stale_locks

ROOT = Path(__file__).parents[1]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1800),
    # Snakemake's marker in directory outputs, which zarr sees when it lists a group
    pytest.mark.filterwarnings("ignore:Object at .snakemake_timestamp is not recognized"),
]

FULL = os.environ.get("DEO_FAULTS", "") == "full"
FULL_POINTS = 4
SEED = 13
TARGETS = ("results/train/deo/checkpoint.pt", "results/train/deo/metrics.csv")
VARIANT = "partner-aug"


def _env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def _command(configfile: str, *args: str) -> list[str]:
    # targets first: --configfile takes every value after it
    cmd = [sys.executable, "-m", "snakemake", *TARGETS, "--cores", "2", *args]
    return [*cmd, "--configfile", configfile]


def snakemake(workdir: Path, *args: str, configfile: str = "faults.yaml") -> str:
    """A plain rerun, as a user types it (profiles/default adds rerun-incomplete)."""
    done = subprocess.run(
        _command(configfile, *args), cwd=workdir, capture_output=True, text=True, env=_env()
    )
    if done.returncode != 0:
        pytest.fail(f"snakemake {args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def interrupt(
    workdir: Path, job: str, delay: float, sig: int, *args: str, start: str | None = None
) -> bool:
    """Run the DAG in its own process group and, ``delay`` s after ``job`` started (its log, or
    ``start``, appeared), send ``sig`` to the whole group. True when ``job`` was still running
    then."""
    log = workdir / (start or JOB_LOGS[job])
    (workdir / JOB_LOGS[job]).unlink(missing_ok=True)
    benchmark = workdir / f"results/benchmarks/{job}.tsv"
    benchmark.unlink(missing_ok=True)
    with open(workdir / "interrupted.log", "w") as out:
        proc = subprocess.Popen(
            _command("faults.yaml", *args),
            cwd=workdir,
            env=_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 900
        while not log.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                text = (workdir / "interrupted.log").read_text()[-3000:]
                pytest.fail(f"the DAG ended before {job} started:\n{text}")
            time.sleep(0.02)
        time.sleep(delay)
        running = not benchmark.exists()  # Snakemake writes it when the job ends
        os.killpg(proc.pid, sig)
        proc.wait(timeout=120)
    finally:
        _wait_group_gone(proc.pid)
    return running


def interrupt_inside(
    workdir: Path, job: str, delay: float, sig: int, *args: str, start: str | None = None
) -> None:
    """``interrupt``, tried again from the same state with half the delay when ``job`` ran
    faster than in the reference and had ended before the signal (a busy machine's timings
    vary), so that the signal always lands inside ``job``."""
    before = workdir.with_name("before-interrupt")
    shutil.copytree(workdir, before, symlinks=True)
    try:
        for _ in range(4):
            if interrupt(workdir, job, delay, sig, *args, start=start):
                return
            shutil.rmtree(workdir)
            shutil.copytree(before, workdir, symlinks=True)
            delay /= 2
        pytest.fail(f"{job} always ended before the signal (last delay {delay:.2f} s)")
    finally:
        shutil.rmtree(before)


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


def write_config(workdir: Path, name: str, change=None) -> str:
    """The embedded default with the teacher cache on (and ``change`` applied), as ``name``."""
    cfg = yaml.safe_load((workdir / "config/config.yaml").read_text())
    cfg["teacher"]["mode"] = "cached"
    cfg["data"]["harmonise"]["shards"] = 2
    cfg["train"]["defaults"]["epochs"] = 2
    if change is not None:
        change(cfg)
    (workdir / name).write_text(yaml.safe_dump(cfg))
    return name


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted run of the DAG up to training, the yardstick of every case.

    It runs in ``<base>/run``, where every case runs too (``fresh_copy``): the mirror's URLs
    hold that absolute path, so a case elsewhere would rerun the downloads and name other paths
    in its rejects. The returned snapshot beside it is never modified."""
    base = tmp_path_factory.mktemp("faults")
    workdir = base / "run"
    workdir.mkdir()
    shutil.copy(ROOT / "Snakefile", workdir)
    for folder in ("workflow", "config", "envs", "profiles"):
        shutil.copytree(ROOT / folder, workdir / folder)
    write_config(workdir, "faults.yaml")
    snakemake(workdir)
    shutil.copytree(workdir, base / "reference", symlinks=True)
    return base / "reference"


def runtime(workdir: Path, job: str) -> float:
    """Wall time of one job in the reference run, from its benchmark record."""
    return float(pd.read_csv(workdir / f"results/benchmarks/{job}.tsv", sep="\t")["s"].iloc[0])


JOB_LOGS = {
    "harmonise_0": "logs/data/harmonise_0.log",
    "merge": "logs/data/merge.log",
    f"cache_teacher_{VARIANT}_0": f"logs/teacher/cache_{VARIANT}_0.log",
    "distill_deo": "logs/train/distill_deo.log",
}
STAGE_JOB = dict(zip(("harmonise", "merge", "cache_teacher", "distill"), JOB_LOGS, strict=True))
# Removing the merge's store, the cache and the run makes Snakemake redo every stage from
# harmonise on (harmonise's shards are temporary: gone since the reference merge).
DOWNSTREAM = (
    "results/data/pretrain.zarr",
    "results/data/pretrain.parquet",
    "results/data/rejects.csv",
    f"results/teacher/{VARIANT}.zarr",
    "results/train/deo",
)


def fresh_copy(reference: Path) -> Path:
    """The reference run, where it ran, with every stage from harmonise on to do again."""
    dest = reference.with_name("run")
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(reference, dest, symlinks=True)
    for rel in DOWNSTREAM:
        path = dest / rel
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return dest


def fractions(n: int, salt: str) -> list[float]:
    """``n`` seeded points inside a job, as fractions of its reference runtime (the end is kept
    clear, so that a job running a little faster than in the reference is still hit)."""
    rng = random.Random(f"{SEED}:{salt}")
    return [round(rng.uniform(0.15, 0.6), 3) for _ in range(n)]


def test_a_kill_in_each_stage_then_a_plain_rerun_gives_the_uninterrupted_outputs(
    reference: Path,
) -> None:
    """One SIGKILL of the whole process group inside each stage in turn, each run picking up
    what the previous kill left, then a plain rerun to the end."""
    workdir = fresh_copy(reference)
    for stage, job in STAGE_JOB.items():
        (fraction,) = fractions(1, stage)
        interrupt_inside(workdir, job, fraction * runtime(reference, job), signal.SIGKILL)

    out = snakemake(workdir)

    assert "IncompleteFilesException" not in out
    assert_same_outputs(reference, workdir)


FULL_MATRIX = [
    (stage, fraction) for stage in STAGE_JOB for fraction in fractions(FULL_POINTS, f"full-{stage}")
]


@pytest.mark.skipif(not FULL, reason="the full kill matrix runs with DEO_FAULTS=full")
@pytest.mark.parametrize(("stage", "fraction"), FULL_MATRIX)
def test_kill_at_a_point_then_a_plain_rerun_gives_the_uninterrupted_outputs(
    reference: Path, stage: str, fraction: float
) -> None:
    workdir = fresh_copy(reference)
    job = STAGE_JOB[stage]
    interrupt_inside(workdir, job, fraction * runtime(reference, job), signal.SIGKILL)

    snakemake(workdir)

    assert_same_outputs(reference, workdir)


def test_sigterm_then_a_settings_change_gives_a_clean_store_of_the_new_settings(
    reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    workdir = fresh_copy(reference)
    nearest = {"10": "nearest", "20": "nearest", "60": "nearest"}
    changed = write_config(
        workdir, "nearest.yaml", lambda c: c["data"]["harmonise"].update(resampling=nearest)
    )
    # once the job has created its partial shard, at a seeded point of the work that follows
    (fraction,) = fractions(1, "sigterm")
    delay = fraction * 0.3 * runtime(reference, "harmonise_0")
    partial = "results/data/shards/0.zarr.partial/partial.json"
    interrupt_inside(
        workdir, "harmonise_0", delay, signal.SIGTERM, "--until", "merge", start=partial
    )
    assert list((workdir / "results/data/shards").glob("*.zarr.partial")), "nothing to reuse"

    snakemake(workdir, "--until", "merge", configfile=changed)

    assert "other settings" in (workdir / "logs/data/harmonise_0.log").read_text()
    monkeypatch.chdir(workdir)
    clean = clean_store(data_config(workdir, changed), tmp_path / "clean")
    found = workdir / "results/data"
    assert_same_group(clean / "pretrain.zarr", found / "pretrain.zarr", skip_attrs=("provenance",))
    pd.testing.assert_frame_equal(
        pd.read_parquet(clean / "pretrain.parquet"), pd.read_parquet(found / "pretrain.parquet")
    )
    assert (clean / "rejects.csv").read_text() == (found / "rejects.csv").read_text()


def clean_store(cfg: DataConfig, out: Path) -> Path:
    """The harmonise and merge stages run uninterrupted in this process, from the pairs table."""
    data, n = Path("results/data"), cfg.harmonise.shards
    rejects = [data / "rejects/pair.csv"]
    for k in range(n):
        rejects.append(out / f"harmonise_{k}.csv")
        stages.harmonise_shard(
            data / "pairs.parquet",
            k,
            n,
            cfg.harmonise,
            cfg.rgb.enabled,
            out / f"{k}.zarr",
            rejects[-1],
        )
    stages.merge(
        [out / f"{k}.zarr" for k in range(n)],
        rejects,
        data / "pairs.parquet",
        cfg,
        out / "pretrain.zarr",
        out / "pretrain.parquet",
        out / "rejects.csv",
        out / "counts.json",
    )
    return out


TIMING = ("images_per_s", "step_s", "max_rss_mb")
"""Columns of metrics.csv that measure the machine, not the training."""


def assert_same_outputs(reference: Path, workdir: Path) -> None:
    data = "results/data"
    assert_same_group(reference / data / "pretrain.zarr", workdir / data / "pretrain.zarr")
    pd.testing.assert_frame_equal(
        pd.read_parquet(reference / data / "pretrain.parquet"),
        pd.read_parquet(workdir / data / "pretrain.parquet"),
    )
    for name in ("rejects.csv", "counts.json", "stats.json"):
        assert (reference / data / name).read_text() == (workdir / data / name).read_text(), name
    assert not list((workdir / data / "shards").glob("*")), "partial shards left over"
    cache = f"results/teacher/{VARIANT}.zarr"
    assert_same_group(reference / cache, workdir / cache)
    assert not list((workdir / "results/teacher").glob(f"{VARIANT}/work-*")), "parts left over"
    train = "results/train/deo"
    expected = torch.load(reference / train / "checkpoint.pt", weights_only=True)
    found = torch.load(workdir / train / "checkpoint.pt", weights_only=True)
    assert_same_tree(expected, found, "checkpoint")
    metrics = [pd.read_csv(w / train / "metrics.csv") for w in (reference, workdir)]
    pd.testing.assert_frame_equal(*(m.drop(columns=list(TIMING)) for m in metrics))


def assert_same_group(expected: Path, found: Path, skip_attrs: tuple[str, ...] = ()) -> None:
    a, b = (zarr.open_group(p, mode="r", zarr_format=3) for p in (expected, found))
    attrs = [{k: v for k, v in g.attrs.items() if k not in skip_attrs} for g in (a, b)]
    assert attrs[0] == attrs[1], expected.name
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
    shard, shards = int(sys.argv[5]), int(sys.argv[6])
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
        Path("results/data/pairs.parquet"), shard, shards, cfg.harmonise, True, Path(out),
        Path(out + ".csv"),
    )
    """
)


def data_config(workdir: Path, name: str = "faults.yaml", **harmonise: object) -> DataConfig:
    data = yaml.safe_load((workdir / name).read_text())["data"]
    data["harmonise"].update(harmonise)
    return from_dict(DataConfig, data)


SHARD = (1, 4)
"""(shard, of shards) of the one-job tests: a quarter of the scenes, with a nodata scene, an
unreadable partner JSON and a corrupt partner JPEG among them."""


def harmonise(cfg: DataConfig, out: Path) -> None:
    pairs = Path("results/data/pairs.parquet")
    stages.harmonise_shard(pairs, *SHARD, cfg.harmonise, True, out, Path(f"{out}.csv"))


def killed_harmonise(cfg: DataConfig, out: Path, where: str, nth: int) -> None:
    args = [where, str(nth), json.dumps(to_dict(cfg)), str(out), *map(str, SHARD)]
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
    ("stages.read_s2", 12),
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
    killed_harmonise(old, out, "stages.read_s2", 10)

    with caplog.at_level("WARNING", logger="deo.data.store"):
        harmonise(new, out)

    assert "other settings" in caplog.text
    assert_same_shard(clean, out)


def test_stale_snakemake_locks_are_removed_only_when_no_run_is_alive(tmp_path: Path) -> None:
    locks = tmp_path / ".snakemake" / "locks"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_RUN_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        locks.mkdir(parents=True)
        (locks / "0.input.lock").write_text("results/x\n")  # the live run's lock
        assert clear_stale_locks(tmp_path) == [] and (locks / "0.input.lock").exists()
    finally:
        holder.kill()
        holder.wait()

    assert clear_stale_locks(tmp_path) == [locks / "0.input.lock"]
    assert not list(locks.iterdir())


HOLD_RUN_LOCK = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from deo.workflow import clear_stale_locks

    clear_stale_locks(Path(sys.argv[1]))
    print("held", flush=True)
    time.sleep(600)
    """
)


# ---- the teacher cache's assembly, killed --------------------------------------------------

KILLED_FINALISE = textwrap.dedent(
    """
    import os, shutil, signal, sys
    from pathlib import Path
    import deo.cache.build as build

    where, nth, out, records = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    owner = shutil if where == "rmtree" else build
    original, calls = getattr(owner, where), []

    def killing(*args, **kwargs):
        calls.append(1)
        if len(calls) == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(owner, where, killing)
    build.finalise([Path(r) for r in records], Path(out))
    """
)


def cache_parts(store: tuple[Path, Path], root: Path) -> list[Path]:
    """Two parts of a teacher cache, built in this process; their records."""
    views = GlobalViews.from_train(parse_train(TINY_TRAIN))
    cfg = CacheConfig(batch_size=4, shards=2)
    records = [root / f"part{j}.json" for j in range(cfg.shards)]
    for j, record in enumerate(records):
        build_part(*store, parse_teacher(TINY_TEACHER), views, cfg, j, root / "work", record)
    return records


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    ("where", "nth"),
    [("_link", 5), ("rmtree", 2)],  # while linking the first part; between removing the parts
)
def test_killed_cache_assembly_finishes_on_rerun(tmp_path: Path, where: str, nth: int) -> None:
    (tmp_path / "store").mkdir()
    store = write_store(tmp_path / "store", n=12)  # two blocks of 8 rows
    finalise(cache_parts(store, tmp_path / "clean"), tmp_path / "clean" / "cache.zarr")
    records = cache_parts(store, tmp_path / "killed")
    out = tmp_path / "killed" / "cache.zarr"
    done = subprocess.run(
        [sys.executable, "-c", KILLED_FINALISE, where, str(nth), str(out), *map(str, records)],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert not out.exists()

    finalise(records, out)

    assert_same_group(tmp_path / "clean" / "cache.zarr", out)
    assert not (tmp_path / "killed" / "work").exists()
    assert not out.with_name("cache.zarr.tmp").exists()
