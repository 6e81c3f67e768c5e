"""The workflow on a real Slurm (slurmctld + slurmd on this machine), through the project's profile.

The embedded-default DAG runs with ``--profile workflow/profiles/slurm`` as a user's would,
the site settings given the way the profile documents (partition and GPU count from the
environment, ``--max-threads`` for a small node), plus the status settings a cluster without
slurmdbd needs. During that run its training job is signalled mid-run, requeued and resumed;
then, on a two-node cluster, training runs one torchrun per node. When Slurm cannot run here
the tests skip with the reason (``.ci/run`` installs it); ``-m "not slurm"`` deselects them.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
import zarr
from slurm_cluster import SlurmCluster, SlurmUnavailable, start

ROOT = Path(__file__).parents[1]
PROFILE = ROOT / "workflow" / "profiles" / "slurm"
BIN = Path(sys.executable).parent
TIMEOUT_S = 1200
# metrics that depend only on the data, the seeds and the arithmetic, not on timing
DETERMINISTIC = ["step", "loss", "compression", "expansion", "cls", "patch_final", "patch_mid"]
SUBMITTED = re.compile(r"submitted with SLURM jobid (\d+) \(log: \S*/slurm_logs/rule_(\w+)/")
JOB = re.compile(r"^localrule (\w+):$", re.MULTILINE)  # how a local run names its jobs


class Clusters:
    """One local cluster at a time (they share ``/run/slurm/conf``); ``get(n)`` swaps sizes."""

    def __init__(self, root: Path) -> None:
        self.root, self.current = root, None

    def get(self, nodes: int) -> SlurmCluster:
        if self.current is not None and len(self.current.nodes) == nodes:
            return self.current
        self.stop()
        try:
            self.current = start(self.root / f"nodes-{nodes}", nodes)
        except SlurmUnavailable as e:
            pytest.skip(f"no local Slurm: {e}")
        return self.current

    def stop(self) -> None:
        if self.current is not None:
            self.current.stop()
            self.current = None


@pytest.fixture(scope="module")
def clusters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clusters]:
    """The cluster, stopped at the end even when the session is ended by SIGTERM (`timeout`)."""

    def interrupt(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the teardown
        raise KeyboardInterrupt(f"signal {signum}")  # pytest then runs the teardowns

    held = Clusters(tmp_path_factory.mktemp("slurm"))
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield held
    finally:
        held.stop()
        signal.signal(signal.SIGTERM, previous)


def copy_workflow(dest: Path) -> Path:
    dest.mkdir(parents=True)
    shutil.copy(ROOT / "Snakefile", dest)
    for folder in ("workflow", "config", "envs"):
        shutil.copytree(ROOT / folder, dest / folder)
    return dest


def slurm_env(cluster: SlurmCluster, **extra: str) -> dict[str, str]:
    """The cluster's client environment with the profile's site settings for it."""
    env = {k: v for k, v in cluster.env.items() if not k.startswith("DEO_SLURM_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    return {
        **env,
        "DEO_SLURM_PARTITION": cluster.partition,
        "DEO_SLURM_GPUS_PER_NODE": "0",  # no GPUs here: the GPU stages run on CPUs
        **extra,
    }


def snakemake_cmd(cluster: SlurmCluster, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "snakemake",
        "--profile",
        str(PROFILE),
        "--max-threads",
        str(cluster.cpus),
        # no slurmdbd here: sacct would wait forever; squeue sees jobs for MinJobAge
        "--slurm-status-command",
        "squeue",
        "--slurm-init-seconds-before-status-checks",
        "1",
        "--latency-wait",
        "5",
        *args,
    ]


@contextmanager
def snakemake_run(
    cmd: list[str], workdir: Path, env: dict[str, str], log: Path, cluster: SlurmCluster
) -> Iterator[subprocess.Popen]:
    """Snakemake running in the background; however the block ends, nothing is left running."""
    with log.open("w") as out:  # a file, not a pipe: nobody has to drain it while we poll
        proc = subprocess.Popen(
            cmd,
            cwd=workdir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group, to kill it with its children
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            cluster.cancel_all()


def finish(proc: subprocess.Popen, cluster: SlurmCluster, log: Path) -> str:
    """The run's output once it ends; failing past the timeout or on a non-zero exit."""
    try:
        proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"snakemake ran past {TIMEOUT_S} s:\n{tail(log)}\n{cluster.logs()}")
    if proc.returncode != 0:
        pytest.fail(f"snakemake failed ({proc.returncode}):\n{tail(log)}")
    return log.read_text()


def tail(log: Path, chars: int = 6000) -> str:
    return log.read_text()[-chars:] if log.is_file() else ""


def metrics(workdir: Path) -> pd.DataFrame:
    """The runs' deterministic metrics; a run without the VFM terms (an ablation) lacks those."""
    runs = yaml.safe_load((workdir / "config/config.yaml").read_text())["train"]["runs"]
    frames = []
    for run in runs:
        table = pd.read_csv(workdir / f"results/train/{run}/metrics.csv")
        frames.append(table[[c for c in DETERMINISTIC if c in table]].assign(run=run))
    assert set(DETERMINISTIC) <= set(frames[list(runs).index("deo")])
    return pd.concat(frames, ignore_index=True)


def forget_training(workdir: Path) -> None:
    """Drop the runs' resumable state, so a forced rerun trains from scratch."""
    for work in workdir.glob("results/train/*/work-*"):
        shutil.rmtree(work)


@dataclass
class Signalled:
    """The training job sent SIGTERM: its Slurm id, its run and the steps it had logged."""

    job: str
    run: str
    steps: int


@dataclass
class Dag:
    local: Path
    slurm: Path
    local_log: str
    slurm_log: str
    signalled: Signalled | None
    seconds: float
    local_seconds: float


@pytest.fixture(scope="module")
def dag(clusters: Clusters, tmp_path_factory: pytest.TempPathFactory) -> Dag:
    """The DAG run locally, then through the Slurm profile with its training job pre-empted.

    One Slurm run shows both: every job goes through sbatch, and a ``distill`` job sent
    ``scancel --signal=TERM`` mid-training is resubmitted and resumes. As a resumed run ends
    exactly where an uninterrupted one does, its results must still equal the local run's.
    """
    cluster = clusters.get(1)
    base = tmp_path_factory.mktemp("dag")
    local, on_slurm = copy_workflow(base / "local"), copy_workflow(base / "slurm")
    local_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    t0 = time.monotonic()
    cmd, log = [sys.executable, "-m", "snakemake", "--cores", "2"], base / "local.log"
    with snakemake_run(cmd, local, local_env, log, cluster) as proc:
        local_log = finish(proc, cluster, log)
    local_seconds = time.monotonic() - t0

    t0, log = time.monotonic(), base / "slurm.log"
    with snakemake_run(snakemake_cmd(cluster), on_slurm, slurm_env(cluster), log, cluster) as proc:
        signalled = signal_training_mid_run(cluster, on_slurm, proc)
        slurm_log = finish(proc, cluster, log)
    seconds = time.monotonic() - t0
    return Dag(local, on_slurm, local_log, slurm_log, signalled, seconds, local_seconds)


def signal_training_mid_run(
    cluster: SlurmCluster, workdir: Path, proc: subprocess.Popen, after_steps: int = 5
) -> Signalled | None:
    """``scancel --signal=TERM`` the first training job once it has logged ``after_steps``.

    Five steps of the demo's four per epoch: the job is mid-epoch, so a resume from its
    signal checkpoint is told apart from one from the last epoch's.
    """
    while proc.poll() is None:
        logs = workdir.glob("results/train/*/work-*/metrics.jsonl")
        steps = max((len(p.read_text().splitlines()) for p in logs), default=0)
        if steps >= after_steps:
            queue = cluster.run("squeue", "-h", "-o", "%i %k %T", check=False).stdout
            for job, comment, state in (
                f for f in map(str.split, queue.splitlines()) if len(f) == 3
            ):
                if comment.startswith("rule_distill") and state == "RUNNING":
                    cluster.run("scancel", "--signal=TERM", job)
                    return Signalled(job, comment.rsplit("_wildcards_", 1)[-1], steps)
        time.sleep(0.1)
    return None


@pytest.mark.slurm
@pytest.mark.timeout(TIMEOUT_S + 600)
def test_every_job_goes_through_sbatch_and_results_equal_a_local_run(dag: Dag) -> None:
    submitted = Counter(rule for _, rule in SUBMITTED.findall(dag.slurm_log))
    # every job the local run ran, but `all` (no action, so it stays in the submitting process)
    every_job = Counter(rule for rule in JOB.findall(dag.local_log) if rule != "all")
    requeued = Counter(distill=1) if dag.signalled else Counter()
    assert submitted == every_job + requeued, dag.slurm_log[-4000:]
    print(
        f"\nlocal DAG {dag.local_seconds:.0f} s; through Slurm {dag.seconds:.0f} s "
        f"for {submitted.total()} sbatch jobs"
    )
    here, there = (
        zarr.open_group(d / "results/data/pretrain.zarr", mode="r") for d in (dag.local, dag.slurm)
    )
    for name in ("s2", "rgb"):
        assert np.array_equal(here[name][:], there[name][:]), name
    pd.testing.assert_frame_equal(metrics(dag.local), metrics(dag.slurm))


@pytest.mark.slurm
def test_a_training_job_signalled_mid_run_is_requeued_and_resumes(dag: Dag) -> None:
    assert dag.signalled, "training ended before it could be signalled"
    job, run = dag.signalled.job, dag.signalled.run
    distill_jobs = [jid for jid, rule in SUBMITTED.findall(dag.slurm_log) if rule == "distill"]
    assert job in distill_jobs and distill_jobs[-1] != job, distill_jobs
    log = (dag.slurm / f"logs/train/distill_{run}.log").read_text()
    resumed = re.search(r"resumed \S+ at step (\d+)", log)
    # the signal's own checkpoint (after the step in progress), not the last epoch's
    assert resumed and int(resumed.group(1)) >= dag.signalled.steps, log[-3000:]
    frame = metrics(dag.slurm)
    assert int(resumed.group(1)) < frame.loc[frame["run"] == run, "step"].max()
    pd.testing.assert_frame_equal(metrics(dag.local), frame)


@pytest.mark.slurm
@pytest.mark.timeout(TIMEOUT_S + 300)
def test_two_nodes_train_with_one_torchrun_per_node(dag: Dag, clusters: Clusters) -> None:
    from deo.train.checkpoint import load_checkpoint

    cluster = clusters.get(2)
    forget_training(dag.slurm)
    cmd = snakemake_cmd(cluster, "--forcerun", "distill", "--until", "distill", "--verbose")
    env = slurm_env(cluster, DEO_SLURM_TRAIN_NODES="2")
    log = dag.slurm.parent / "two-nodes.log"
    with snakemake_run(cmd, dag.slurm, env, log, cluster) as proc:
        out = finish(proc, cluster, log)

    sbatch = [
        line for line in out.splitlines() if "sbatch call:" in line and "rule_distill" in line
    ]
    assert sbatch and all("--nodes=2" in s and "--ntasks=2" in s for s in sbatch), sbatch
    assert not any("--ntasks-per-gpu" in s for s in sbatch)
    for run in set(metrics(dag.local)["run"]):
        train_log = (dag.slurm / f"logs/train/distill_{run}.log").read_text()
        launches = re.findall(r"launching: \S+ -m torch\.distributed\.run (.*?) -m deo", train_log)
        assert len(launches) == 2, train_log[-3000:]
        assert sorted("is_host=true" in a for a in launches) == [False, True], launches
        state = load_checkpoint(dag.slurm / f"results/train/{run}/checkpoint.pt")
        assert len(state["rank_checksums"]) == 2
        assert state["rank_checksums"][0] == state["rank_checksums"][1]


def test_install_profile_makes_the_bare_profile_name_work(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    deo = [str(BIN / "deo"), "install-profile"]
    for _ in range(2):  # installing again is a no-op
        done = subprocess.run(deo, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    link = tmp_path / "config/snakemake/slurm"
    assert link.is_symlink() and link.resolve() == PROFILE.resolve()

    workdir = copy_workflow(tmp_path / "wf")
    dry = subprocess.run(
        [sys.executable, "-m", "snakemake", "--profile", "slurm", "-n", "--quiet", "rules"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
    )
    assert dry.returncode == 0 and "Using profile slurm" in dry.stderr, dry.stderr[-3000:]

    link.unlink()
    link.mkdir()  # a user's own profile is kept unless asked
    done = subprocess.run(deo, env=env, capture_output=True, text=True)
    assert done.returncode == 1 and "--force" in done.stderr
    done = subprocess.run([*deo, "--force"], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and link.is_symlink()
