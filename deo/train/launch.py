"""How one ``deo train`` becomes its ranks: in this process, torchrun, or torchrun per Slurm node.

``deo train`` is the same command on a laptop, on one GPU node and on several nodes; only
the resources it is given differ (the rule passes Snakemake's ``gpu``, ``nodes`` and
``threads``). :func:`plan` turns them and the environment into the next command to run:

1. a rank (torchrun set ``LOCAL_RANK``), or one process in all: train here;
2. several nodes, not yet on them: ``srun`` one launcher per node (``--ntasks-per-node=1``),
   which runs this same command again with :data:`NODE_STEP` set;
3. a node's launcher, or one node with several ranks: ``torchrun`` with one rank per GPU of
   this node. Across nodes the c10d rendezvous is hosted by the job's first node, on a port
   derived from the job id, so every node computes the same endpoint without talking.

Pure functions of their inputs, so the Slurm cases are tested with fake environments.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from deo.errors import DeoError

NODE_STEP = "DEO_NODE_LAUNCHER"
"""Set on the per-node ``srun`` step, so a node's launcher does not ``srun`` again."""

PORT_BASE, PORT_SPAN = 20000, 12000
"""Rendezvous ports ``PORT_BASE + job id % PORT_SPAN``: below Linux's ephemeral range (32768+)."""


class LaunchError(DeoError):
    """The resources cannot be launched here; the message names the setting to change."""


@dataclass(frozen=True)
class Resources:
    """What the job was given: ``gpus`` over all nodes (Slurm's ``--gpus``), per-node CPUs."""

    gpus: int = 0
    nodes: int = 1
    cpus_per_node: int = 1
    nproc_per_node: int | None = None
    """Ranks per node when set (CPU tests); otherwise one per GPU of the node, at least one."""


@dataclass(frozen=True)
class Launch:
    """The command to replace this process with, and the variables to add to its environment."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


def first_host(nodelist: str) -> str:
    """The first host of a Slurm hostlist, e.g. ``gpu[007-009,012],cpu1`` → ``gpu007``.

    The first host of a list is built from the first value of each bracket of its first
    element, zero padding kept; this avoids calling ``scontrol show hostnames``.
    """
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end].strip()
    host = re.sub(r"\[([^\]\-,]+)[^\]]*\]", r"\1", first)
    if not host or any(c in host for c in "[],"):
        raise LaunchError(f"cannot read the first host of the Slurm node list {nodelist!r}")
    return host


def ranks_per_node(res: Resources, env: Mapping[str, str]) -> int:
    """One rank per GPU Slurm placed on this node (``SLURM_GPUS_ON_NODE``), else an even share."""
    if res.nproc_per_node is not None:
        return max(1, res.nproc_per_node)
    on_node = env.get("SLURM_GPUS_ON_NODE", "")
    if on_node.isdigit():
        return max(1, int(on_node))
    if res.gpus % res.nodes:
        raise LaunchError(
            f"gpu={res.gpus} does not split evenly over nodes={res.nodes}: "
            "give a multiple of the node count"
        )
    return max(1, res.gpus // res.nodes)


def rendezvous_port(job_id: str, env: Mapping[str, str]) -> int:
    """``MASTER_PORT`` when the site sets one, else a port every node derives from the job id."""
    if env.get("MASTER_PORT", "").isdigit():
        return int(env["MASTER_PORT"])
    return PORT_BASE + int(re.sub(r"\D", "", job_id) or 0) % PORT_SPAN


def plan(
    argv: Sequence[str], res: Resources, env: Mapping[str, str], python: str = sys.executable
) -> Launch | None:
    """The launch for ``deo <argv>`` with these resources, or None to train in this process."""
    if res.nodes < 1 or res.gpus < 0 or res.cpus_per_node < 1:
        raise LaunchError(f"nodes, gpu and threads must be positive, got {res}")
    if "LOCAL_RANK" in env:
        return None
    me = [python, "-m", "deo.cli", *argv]
    if res.nodes > 1:
        job = env.get("SLURM_JOB_ID")
        if not job:
            raise LaunchError(
                f"nodes={res.nodes} needs a Slurm allocation (SLURM_JOB_ID is unset): run "
                "through `--profile slurm`, or set the distill rule's nodes to 1"
            )
        if env.get(NODE_STEP) != "1":
            return _srun_per_node(me, res)
        return _torchrun_across_nodes(me, res, env, job)
    nproc = ranks_per_node(res, env)
    if nproc == 1:
        return None
    torchrun = [python, "-m", "torch.distributed.run", "--standalone"]
    return Launch([*torchrun, f"--nproc-per-node={nproc}", *me[1:]])


def _srun_per_node(me: list[str], res: Resources) -> Launch:
    """One launcher per node; a failing node ends the step rather than leaving others waiting."""
    srun = [
        "srun",
        f"--nodes={res.nodes}",
        f"--ntasks={res.nodes}",
        "--ntasks-per-node=1",
        f"--cpus-per-task={res.cpus_per_node}",
        "--kill-on-bad-exit=1",
    ]
    return Launch([*srun, *me], {NODE_STEP: "1"})


def _torchrun_across_nodes(
    me: list[str], res: Resources, env: Mapping[str, str], job: str
) -> Launch:
    """torchrun on this node of the step, meeting the others at the first node's c10d store."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
    node_id = env.get("SLURM_NODEID", "")
    if not nodelist or not node_id.isdigit():
        raise LaunchError(
            f"{NODE_STEP}=1 but SLURM_NODEID / SLURM_JOB_NODELIST are unset: "
            "this launcher runs inside the per-node srun step only"
        )
    host, port = first_host(nodelist), rendezvous_port(job, env)
    return Launch(
        [
            me[0],
            "-m",
            "torch.distributed.run",
            f"--nnodes={res.nodes}",  # ranks come from the rendezvous, not from node ids
            f"--nproc-per-node={ranks_per_node(res, env)}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={host}:{port}",
            f"--rdzv-id=deo-{job}",
            # the first node hosts the store, by rank rather than by matching host names
            f"--rdzv-conf=is_host={'true' if node_id == '0' else 'false'}",
            "--max-restarts=0",
            *me[1:],
        ]
    )
