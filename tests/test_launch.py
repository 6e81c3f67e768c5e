"""The rank launcher of ``deo train``, against the environments Slurm and torchrun give it."""

from __future__ import annotations

import pytest

from deo.train.launch import NODE_STEP, LaunchError, Resources, first_host, plan

ARGS = ["train", "--train", "{}", "--gpus", "8", "--nodes", "2"]
PY = "/venv/bin/python"

# What a two-node job's per-node srun step sees on its second node (Slurm 22.05 names).
NODE_1 = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "gpu[007-008]",
    "SLURM_STEP_NODELIST": "gpu[007-008]",
    "SLURM_NNODES": "2",
    "SLURM_NODEID": "1",
    "SLURM_GPUS_ON_NODE": "4",
    NODE_STEP: "1",
}


def option(argv: list[str], name: str) -> str:
    """The value of ``--name=value`` in a command line."""
    (value,) = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    return value


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [
        ("node1", "node1"),
        ("n[0-1]", "n0"),
        ("gpu[007-009,012],cpu1", "gpu007"),
        ("cpu1,gpu[007-009]", "cpu1"),
        ("rack[2-3]-gpu[01-04]", "rack2-gpu01"),
        ("vm,vm-1", "vm"),
    ],
)
def test_first_host_of_a_slurm_hostlist(nodelist: str, host: str) -> None:
    assert first_host(nodelist) == host


def test_first_host_refuses_a_malformed_list() -> None:
    with pytest.raises(LaunchError, match="first host"):
        first_host("gpu[01")


def test_a_cpu_job_trains_in_this_process() -> None:
    assert plan(ARGS, Resources(gpus=0), {}, PY) is None
    assert plan(ARGS, Resources(gpus=1), {"SLURM_JOB_ID": "7"}, PY) is None


def test_a_rank_never_launches_again() -> None:
    env = {**NODE_1, "LOCAL_RANK": "0", "RANK": "5"}
    assert plan(ARGS, Resources(gpus=8, nodes=2), env, PY) is None


def test_one_node_with_gpus_runs_standalone_torchrun_one_rank_per_gpu() -> None:
    launch = plan(ARGS, Resources(gpus=4), {}, PY)
    assert launch is not None
    assert launch.argv[:4] == [PY, "-m", "torch.distributed.run", "--standalone"]
    assert option(launch.argv, "nproc-per-node") == "4"
    assert launch.argv[-len(ARGS) - 2 :] == ["-m", "deo.cli", *ARGS]


def test_slurm_gpus_on_the_node_win_over_an_even_share() -> None:
    launch = plan(ARGS, Resources(gpus=4), {"SLURM_GPUS_ON_NODE": "2"}, PY)
    assert launch is not None and option(launch.argv, "nproc-per-node") == "2"


def test_explicit_ranks_per_node_on_cpu() -> None:
    launch = plan(ARGS, Resources(gpus=0, nproc_per_node=2), {}, PY)
    assert launch is not None and option(launch.argv, "nproc-per-node") == "2"


def test_several_nodes_start_one_launcher_per_node_with_srun() -> None:
    res = Resources(gpus=8, nodes=2, cpus_per_node=48)
    # the plugin's jobstep keeps only SLURM_JOB_ID of the batch environment
    launch = plan(ARGS, res, {"SLURM_JOB_ID": "4242"}, PY)
    assert launch is not None and launch.argv[0] == "srun"
    srun = launch.argv[: launch.argv.index(PY)]
    assert {"--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--cpus-per-task=48"} <= set(srun)
    assert launch.argv[len(srun) :] == [PY, "-m", "deo.cli", *ARGS]
    assert launch.env == {NODE_STEP: "1"}


def test_each_node_runs_torchrun_meeting_at_the_first_node() -> None:
    launches = {}
    for node in ("0", "1"):
        env = {**NODE_1, "SLURM_NODEID": node}
        launches[node] = plan(ARGS, Resources(gpus=8, nodes=2), env, PY)
    for node, launch in launches.items():
        assert launch is not None and launch.argv[1:3] == ["-m", "torch.distributed.run"]
        argv = launch.argv
        assert option(argv, "nnodes") == "2" and option(argv, "nproc-per-node") == "4"
        assert option(argv, "rdzv-backend") == "c10d"
        assert option(argv, "rdzv-endpoint") == "gpu007:24242"
        assert option(argv, "rdzv-id") == "deo-4242"
        assert option(argv, "rdzv-conf") == f"is_host={'true' if node == '0' else 'false'}"
        assert argv[-len(ARGS) - 2 :] == ["-m", "deo.cli", *ARGS]


def test_a_site_master_port_is_used() -> None:
    env = {**NODE_1, "MASTER_PORT": "29500"}
    launch = plan(ARGS, Resources(gpus=8, nodes=2), env, PY)
    assert launch is not None and option(launch.argv, "rdzv-endpoint") == "gpu007:29500"


def test_cpu_nodes_run_one_rank_each() -> None:
    env = {**NODE_1}
    del env["SLURM_GPUS_ON_NODE"]
    launch = plan(ARGS, Resources(gpus=0, nodes=2), env, PY)
    assert launch is not None and option(launch.argv, "nproc-per-node") == "1"


def test_several_nodes_without_slurm_say_what_to_change() -> None:
    with pytest.raises(LaunchError, match="needs a Slurm allocation"):
        plan(ARGS, Resources(gpus=8, nodes=2), {}, PY)


def test_gpus_that_do_not_split_over_the_nodes_are_refused() -> None:
    env = {**NODE_1}
    del env["SLURM_GPUS_ON_NODE"]
    with pytest.raises(LaunchError, match="multiple of the node count"):
        plan(ARGS, Resources(gpus=3, nodes=2), env, PY)


def test_a_node_step_without_slurm_node_variables_is_refused() -> None:
    with pytest.raises(LaunchError, match="SLURM_NODEID"):
        plan(ARGS, Resources(gpus=8, nodes=2), {"SLURM_JOB_ID": "1", NODE_STEP: "1"}, PY)
