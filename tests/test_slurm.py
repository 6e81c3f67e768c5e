"""The workflow on a real Slurm (slurmctld + slurmd on this machine), through the project's profile.

The embedded-default DAG runs with ``--profile workflow/profiles/slurm`` as a user's would,
the site settings given the way the profile documents (partition and GPU count from the
environment, ``--max-threads`` for a small node), plus the status settings a cluster without
slurmdbd needs. Then, on the same cluster, a training job signalled mid-run is requeued and
resumes exactly; and on a two-node cluster, training runs one torchrun per node. When Slurm
cannot run here the tests skip with the reason (``.ci/run`` installs it).
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
RAN_HERE = re.compile(r"^rule (\w+):$", re.MULTILINE)


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
    held = Clusters(tmp_path_factory.mktemp("slurm"))
    yield held
    held.stop()


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


def finish(proc: subprocess.Popen, cluster: SlurmCluster) -> str:
    """The run's output once it ends; past the timeout it and its jobs are killed."""
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        cluster.run("scancel", "--user", "root", check=False)
        out, _ = proc.communicate()
        pytest.fail(f"snakemake ran past {TIMEOUT_S} s:\n{out[-4000:]}\n{cluster.logs()}")
    if proc.returncode != 0:
        pytest.fail(f"snakemake failed ({proc.returncode}):\n{out[-6000:]}")
    return out


def popen(cmd: list[str], workdir: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # so a timeout can kill it with its children
    )


def metrics(workdir: Path) -> pd.DataFrame:
    runs = yaml.safe_load((workdir / "config/config.yaml").read_text())["train"]["runs"]
    frames = [
        pd.read_csv(workdir / f"results/train/{run}/metrics.csv")[DETERMINISTIC].assign(run=run)
        for run in runs
    ]
    return pd.concat(frames, ignore_index=True)


def forget_training(workdir: Path) -> None:
    """Drop the runs' resumable state, so a forced rerun trains from scratch."""
    for work in workdir.glob("results/train/*/work-*"):
        shutil.rmtree(work)


@dataclass
class Dag:
    local: Path
    slurm: Path
    local_log: str
    slurm_log: str
    metrics: pd.DataFrame
    seconds: float


@pytest.fixture(scope="module")
def dag(clusters: Clusters, tmp_path_factory: pytest.TempPathFactory) -> Dag:
    """The DAG run locally and through the Slurm profile at the same time, in two copies."""
    cluster = clusters.get(1)
    base = tmp_path_factory.mktemp("dag")
    local, on_slurm = copy_workflow(base / "local"), copy_workflow(base / "slurm")
    local_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    here = popen([sys.executable, "-m", "snakemake", "--cores", "2"], local, local_env)
    t0 = time.monotonic()
    slurm_log = finish(popen(snakemake_cmd(cluster), on_slurm, slurm_env(cluster)), cluster)
    seconds = time.monotonic() - t0
    local_log = finish(here, cluster)
    return Dag(local, on_slurm, local_log, slurm_log, metrics(on_slurm), seconds)


@pytest.mark.slurm
@pytest.mark.timeout(TIMEOUT_S + 300)
def test_every_job_goes_through_sbatch_and_results_equal_a_local_run(dag: Dag) -> None:
    submitted = Counter(rule for _, rule in SUBMITTED.findall(dag.slurm_log))
    assert submitted == Counter(RAN_HERE.findall(dag.local_log)), dag.slurm_log[-4000:]
    print(f"\nDAG through Slurm: {sum(submitted.values())} sbatch jobs in {dag.seconds:.0f} s")

    here, there = (
        zarr.open_group(d / "results/data/pretrain.zarr", mode="r") for d in (dag.local, dag.slurm)
    )
    for name in ("s2", "rgb"):
        assert np.array_equal(here[name][:], there[name][:]), name
    pd.testing.assert_frame_equal(metrics(dag.local), dag.metrics)


@pytest.mark.slurm
@pytest.mark.timeout(TIMEOUT_S + 300)
def test_a_training_job_signalled_mid_run_is_requeued_and_resumes(
    dag: Dag, clusters: Clusters
) -> None:
    cluster = clusters.get(1)
    forget_training(dag.slurm)
    proc = popen(snakemake_cmd(cluster, "--forcerun", "distill"), dag.slurm, slurm_env(cluster))
    job, run = signal_training_mid_run(cluster, dag.slurm, proc)
    out = finish(proc, cluster)

    distill_jobs = [jid for jid, rule in SUBMITTED.findall(out) if rule == "distill"]
    assert job in distill_jobs and len(distill_jobs) > len(set(dag.metrics["run"])), out[-4000:]
    log = (dag.slurm / f"logs/train/distill_{run}.log").read_text()
    resumed = re.search(r"resumed \S+ at step (\d+)", log)
    assert resumed and 0 < int(resumed.group(1)) < dag.metrics["step"].max(), log[-3000:]
    # the requeued job ends exactly where the uninterrupted one did
    pd.testing.assert_frame_equal(metrics(dag.slurm), dag.metrics)


def signal_training_mid_run(
    cluster: SlurmCluster, workdir: Path, proc: subprocess.Popen
) -> tuple[str, str]:
    """``scancel --signal=TERM`` the first training job after its second step; its id and run."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        logs = workdir.glob("results/train/*/work-*/metrics.jsonl")
        steps = [len(p.read_text().splitlines()) for p in logs]
        queue = cluster.run("squeue", "-h", "-o", "%i %k %T", check=False).stdout.split("\n")
        running = [line.split() for line in queue if "rule_distill" in line and "RUNNING" in line]
        if running and max(steps, default=0) >= 2:
            job, comment, _ = running[0]
            cluster.run("scancel", "--signal=TERM", job)
            return job, comment.rsplit("_wildcards_", 1)[-1]
        time.sleep(0.1)
    out = proc.communicate()[0] if proc.poll() is not None else ""
    pytest.fail(f"training never got two steps in while running:\n{out[-4000:]}")


@pytest.mark.slurm
@pytest.mark.timeout(TIMEOUT_S + 300)
def test_two_nodes_train_with_one_torchrun_per_node(dag: Dag, clusters: Clusters) -> None:
    from deo.train.checkpoint import load_checkpoint

    cluster = clusters.get(2)
    forget_training(dag.slurm)
    cmd = snakemake_cmd(cluster, "--forcerun", "distill", "--until", "distill", "--verbose")
    env = slurm_env(cluster, DEO_SLURM_TRAIN_NODES="2")
    out = finish(popen(cmd, dag.slurm, env), cluster)

    sbatch = [
        line for line in out.splitlines() if "sbatch call:" in line and "rule_distill" in line
    ]
    assert sbatch and all("--nodes=2" in s and "--ntasks=2" in s for s in sbatch), sbatch
    assert not any("--ntasks-per-gpu" in s for s in sbatch)
    for run in set(dag.metrics["run"]):
        log = (dag.slurm / f"logs/train/distill_{run}.log").read_text()
        launches = re.findall(r"launching: \S+ -m torch\.distributed\.run (.*?) -m deo", log)
        assert len(launches) == 2, log[-3000:]
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
