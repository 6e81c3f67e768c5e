"""A throw-away Slurm cluster on this machine, for tests that must see real ``sbatch``.

Debian's slurmctld + slurmd (22.05) and munge, started by hand (no systemd), with every
state, spool, pid and log file in one temporary folder and ``SLURM_CONF`` pointing at its
``slurm.conf``; nothing under ``/etc`` is written, only munge's and slurmd's run folders
(``/run/munge``, ``/run/slurm``). The settings are the ones measured on these machines
(linuxproc tracking, no task plugin, cons_tres with memory, ``DefMemPerCPU`` so a job does
not take the whole node, ``MinJobAge`` long enough for ``squeue``-based status checks).

With ``nodes > 1`` several slurmd daemons on this host play separate nodes (each under its
own name and port): that is how a multi-node launch is tried on one machine. The daemons run
"configless": slurmd fetches the config from slurmctld and links it at ``/run/slurm/conf``,
where a job's own ``srun`` finds it (Snakemake's jobstep plugin drops ``SLURM_CONF`` with
the other ``SLURM_*`` variables). As there is one such link, one test cluster runs per
machine at a time (a lock file). Needs root (slurmd runs jobs as their users); ``start``
raises :class:`SlurmUnavailable` with the reason when the cluster cannot run, so tests skip.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "srun", "sinfo", "munge")
PARTITION = "debug"
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
CONFIGLESS_LINK = Path("/run/slurm/conf")
MIN_MEM_MB = 16384
LOCK = Path("/run/lock/deo-test-slurm.lock")


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run here; the message says why (for ``pytest.skip``)."""


def missing_programs() -> list[str]:
    """The Slurm and munge programs this machine lacks (empty when all are installed)."""
    found = {name: shutil.which(name) or _sbin(name) for name in (*DAEMONS, *CLIENTS)}
    return [name for name, path in found.items() if not path]


def _sbin(name: str) -> str | None:
    """Daemons live in /usr/sbin, which a non-login PATH may lack."""
    path = Path("/usr/sbin", name)
    return str(path) if path.is_file() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_hardware() -> tuple[str, int]:
    """This host's CPU line from ``slurmd -C`` and ~90% of its memory (MB), for the node line.

    The memory is claimed as at least :data:`MIN_MEM_MB` (``config_overrides``: slurmd does
    not check it, and nothing enforces it) so the profile's requests fit a small CI machine.
    """
    out = subprocess.run([_sbin("slurmd") or "slurmd", "-C"], capture_output=True, text=True)
    first = out.stdout.splitlines()[0] if out.stdout else ""
    cpus = re.search(r"CPUs=\d+.*?ThreadsPerCore=\d+", first)
    mem = re.search(r"RealMemory=(\d+)", first)
    if not (cpus and mem):
        raise SlurmUnavailable(f"slurmd -C gave no node description: {out.stderr or first!r}")
    return cpus.group(0), max(MIN_MEM_MB, int(int(mem.group(1)) * 0.9))


@dataclass
class SlurmCluster:
    """A running cluster; ``env`` is what a client (sbatch, snakemake) needs to reach it."""

    root: Path
    nodes: list[str]
    partition: str = PARTITION
    pids: list[int] = field(default_factory=list)
    lock: int | None = None

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def cpus(self) -> int:
        """CPUs of one node (for ``--max-threads``)."""
        return int(re.search(r" CPUs=(\d+)", self.conf.read_text()).group(1))

    @property
    def ctld_port(self) -> int:
        return int(re.search(r"SlurmctldPort=(\d+)", self.conf.read_text()).group(1))

    @property
    def env(self) -> dict[str, str]:
        path = os.pathsep.join(["/usr/sbin", os.environ.get("PATH", "")])
        return {**os.environ, "SLURM_CONF": str(self.conf), "PATH": path}

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster."""
        return subprocess.run(args, env=self.env, capture_output=True, text=True, check=check)

    def logs(self) -> str:
        """The daemons' log tails, for a failing test's message."""
        parts = []
        for log in sorted(self.root.glob("*.log")):
            parts.append(f"== {log.name}\n" + "\n".join(log.read_text().splitlines()[-30:]))
        return "\n".join(parts)

    def cancel_all(self, wait_s: float = 30.0) -> None:
        """Cancel every job of this cluster and wait for them to leave the nodes."""
        jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
        if jobs:
            self.run("scancel", *jobs, check=False)
            _wait(lambda: not self.run("squeue", "-h", "-t", "R,CG", check=False).stdout, wait_s)

    def stop(self) -> None:
        """Cancel its jobs (slurmd's shutdown would orphan them), then end its daemons."""
        self.cancel_all()
        self.run("scontrol", "shutdown", check=False)
        for pid in reversed(self.pids):
            _terminate(pid)
        self.pids.clear()
        if CONFIGLESS_LINK.is_symlink() and str(self.root) in os.readlink(CONFIGLESS_LINK):
            CONFIGLESS_LINK.unlink()
        if self.lock is not None:
            os.close(self.lock)  # releases the flock
            self.lock = None


def _terminate(pid: int, wait_s: float = 10.0) -> None:
    try:
        os.kill(pid, 15)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 9)


def write_conf(root: Path, nodes: list[str]) -> Path:
    """A slurm.conf with state, spool, pid and log paths under ``root``; one node per slurmd."""
    cpus, mem_mb = _node_hardware()
    ctld_port = _free_port()
    node_lines = []
    for name in nodes:
        (root / "spool" / name).mkdir(parents=True, exist_ok=True)
        node_lines.append(
            f"NodeName={name} NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 "
            f"Port={_free_port()} {cpus} RealMemory={mem_mb} State=UNKNOWN"
        )
    (root / "state").mkdir(parents=True, exist_ok=True)
    text = f"""\
ClusterName=deotest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
MinJobAge=300
ReturnToService=2
SchedulerType=sched/backfill
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
MpiDefault=none
SlurmdParameters=config_overrides
SlurmctldParameters=enable_configless
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
{chr(10).join(node_lines)}
PartitionName={PARTITION} Nodes={",".join(nodes)} Default=YES MaxTime=INFINITE State=UP
"""
    conf = root / "slurm.conf"
    conf.write_text(text)
    return conf


def _munge_running() -> bool:
    return subprocess.run(["munge", "-n"], capture_output=True).returncode == 0


def _start_munge(pids: list[int]) -> None:
    """munged as its own user, as Debian's unit would; reused when one already answers."""
    if _munge_running():
        return
    run_dir = Path("/run/munge")
    subprocess.run(["install", "-d", "-o", "munge", str(run_dir)], check=True)
    done = subprocess.run(["runuser", "-u", "munge", "--", _sbin("munged") or "munged"])
    if done.returncode != 0 or not _wait(_munge_running, 10):
        raise SlurmUnavailable("munged did not start")
    pid_file = run_dir / "munged.pid"
    if pid_file.is_file():
        pids.append(int(pid_file.read_text().split()[0]))


def _wait(ok, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ok():
            return True
        time.sleep(0.2)
    return False


def _pid(path: Path) -> int | None:
    return int(path.read_text().split()[0]) if path.is_file() else None


def start(root: Path, nodes: int = 1, timeout_s: float = 30.0) -> SlurmCluster:
    """Start munge (if none runs), slurmctld and ``nodes`` slurmd; return once all are idle."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("a local Slurm needs root (slurmd runs jobs as their users)")
    if SYSTEM_CONF.exists():
        raise SlurmUnavailable(f"{SYSTEM_CONF} exists: jobs' srun would reach that cluster")
    missing = missing_programs()
    if missing:
        raise SlurmUnavailable(
            f"not installed: {', '.join(missing)} (apt-get install slurmctld slurmd "
            "slurm-client munge)"
        )
    # the first node, which hosts a multi-node job's rendezvous, is named as this host
    host = socket.gethostname().split(".")[0]
    names = [host, *(f"{host}-{i}" for i in range(1, nodes))]
    cluster = SlurmCluster(root, names, lock=_lock(timeout_s))
    env = cluster.env
    try:
        write_conf(root, names)
        _start_munge(cluster.pids)
        subprocess.run([_sbin("slurmctld") or "slurmctld"], env=env, check=True)
        _record(cluster, root / "slurmctld.pid")
        if not _wait(lambda: cluster.run("scontrol", "ping", check=False).returncode == 0, 15):
            raise SlurmUnavailable("slurmctld does not answer")
        for name in names:
            server = f"--conf-server=localhost:{cluster.ctld_port}"
            subprocess.run([_sbin("slurmd") or "slurmd", server, "-N", name], env=env, check=True)
            _record(cluster, root / f"slurmd-{name}.pid")
        if not _wait(lambda: _idle(cluster) == len(names), timeout_s):
            raise SlurmUnavailable(f"nodes did not come up idle:\n{cluster.logs()}")
    except (subprocess.CalledProcessError, SlurmUnavailable) as e:
        cluster.stop()
        raise SlurmUnavailable(f"{e}\n{cluster.logs()}") from e
    return cluster


def _lock(timeout_s: float) -> int:
    """This machine's test-cluster lock, held until :meth:`SlurmCluster.stop`."""
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o644)

    def take() -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    if not _wait(take, timeout_s):
        os.close(fd)
        raise SlurmUnavailable(f"another test cluster runs on this machine ({LOCK} is held)")
    return fd


def _record(cluster: SlurmCluster, pid_file: Path) -> None:
    _wait(pid_file.is_file, 10)
    pid = _pid(pid_file)
    if pid is None:
        raise SlurmUnavailable(f"{pid_file.name} did not appear")
    cluster.pids.append(pid)


def _idle(cluster: SlurmCluster) -> int:
    out = cluster.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout
    return sum(1 for line in out.splitlines() if line.split()[-1:] == ["idle"])
