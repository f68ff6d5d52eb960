"""retnet_train.preflight.launch_env: SLURM hostlists, per-node launch variables, hostfiles, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from retnet_train.preflight.launch_env import (
    LaunchEnvError,
    expand_nodelist,
    hostfile_lines,
    launch_env_from,
    main,
    read_hostfile,
)


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node1", ["node1"]),
        ("gpu[001-004,007],cpu1", ["gpu001", "gpu002", "gpu003", "gpu004", "gpu007", "cpu1"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("n[08-10]", ["n08", "n09", "n10"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("a[1,3],b[2-3]", ["a1", "a3", "b2", "b3"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("nid[001-002]-ib,login", ["nid001-ib", "nid002-ib", "login"]),
        ("frontier[00001,10000]", ["frontier00001", "frontier10000"]),
        (" x[5] ", ["x5"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize(
    "nodelist, fragment",
    [
        ("", "empty or unset"),
        ("gpu[1-3", "unclosed '['"),
        ("gpu1-3]", "unmatched ']'"),
        ("gpu[1-[2]]", "nested '['"),
        ("gpu[3-1]", "descending range '3-1'"),
        ("gpu[a-b]", "bad range 'a-b'"),
        ("gpu[1-2-3]", "bad range '1-2-3'"),
        ("gpu[]", "empty brackets"),
        ("a,,b", "empty host name"),
        ("a[1-2],a2", "host 'a2' listed twice"),
        ("my node", "whitespace"),
    ],
)
def test_expand_nodelist_rejects(nodelist, fragment):
    with pytest.raises(LaunchEnvError) as exc:
        expand_nodelist(nodelist)
    assert str(exc.value).startswith("SLURM_JOB_NODELIST")
    assert fragment in str(exc.value)


def slurm(nodes: str = "gpu[001-004]", nnodes: int = 4, nodeid: int = 0, **extra) -> dict:
    env = {
        "SLURM_JOB_NODELIST": nodes,
        "SLURM_JOB_NUM_NODES": str(nnodes),
        "SLURM_NNODES": str(nnodes),
        "SLURM_NODEID": str(nodeid),
        "SLURM_JOB_ID": "123456",
        "SLURM_GPUS_ON_NODE": "8",
    }
    env.update({k: v for k, v in extra.items() if v is not None})
    return {k: v for k, v in env.items() if not (k in extra and extra[k] is None)}


def test_four_nodes_agree_on_everything_but_their_rank():
    envs = [launch_env_from(slurm(nodeid=i, SLURMD_NODENAME=f"gpu00{i + 1}")) for i in range(4)]
    assert [e.node_rank for e in envs] == [0, 1, 2, 3]
    for e in envs:
        assert (e.nnodes, e.nproc_per_node, e.world_size) == (4, 8, 32)
        assert e.master_addr == "gpu001"
        assert e.master_port == 10000 + 123456 % 50000 == 33456
        assert e.rdzv_id == "123456"
        assert e.hosts == ("gpu001", "gpu002", "gpu003", "gpu004")


def test_single_node():
    e = launch_env_from(slurm(nodes="dgx7", nnodes=1))
    assert (e.nnodes, e.node_rank, e.master_addr, e.world_size) == (1, 0, "dgx7", 8)


def test_explicit_variables_win():
    e = launch_env_from(slurm(MASTER_ADDR="10.1.2.3", MASTER_PORT="40000", NPROC_PER_NODE="4", RDZV_ID="run-a"))
    assert (e.master_addr, e.master_port, e.nproc_per_node, e.rdzv_id) == ("10.1.2.3", 40000, 4, "run-a")
    assert launch_env_from(slurm(), nproc_per_node=2, node_rank=3).node_rank == 3


def test_exported_node_rank_does_not_leak_into_srun_tasks():
    # srun copies the batch host's environment to every task: a NODE_RANK=0 exported there must
    # not make every node rank 0.
    assert launch_env_from(slurm(nodeid=2, NODE_RANK="0")).node_rank == 2


@pytest.mark.parametrize("gpus_per_node, expected", [("8", 8), ("a100:4", 4), ("gpu:mi250x:8", 8)])
def test_gpu_count_from_gpus_per_node(gpus_per_node, expected):
    e = launch_env_from(slurm(SLURM_GPUS_ON_NODE=None, SLURM_GPUS_PER_NODE=gpus_per_node))
    assert e.nproc_per_node == expected


def test_default_port_without_job_id():
    assert launch_env_from(slurm(SLURM_JOB_ID=None)).master_port == 29500


@pytest.mark.parametrize(
    "env, fragment",
    [
        (slurm(SLURM_JOB_NODELIST=None), "SLURM_JOB_NODELIST is unset"),
        (slurm(SLURM_NODEID=None), "SLURM_NODEID is unset"),
        (slurm(nodeid=4), "SLURM_NODEID=4 is out of range for 4 node(s)"),
        (slurm(SLURM_NODEID="x"), "SLURM_NODEID='x' is not an integer"),
        (slurm(SLURM_JOB_NUM_NODES="3"), "SLURM_JOB_NUM_NODES=3 but SLURM_JOB_NODELIST='gpu[001-004]' lists 4 hosts"),
        (slurm(SLURM_GPUS_ON_NODE=None), "NPROC_PER_NODE is unset and SLURM_GPUS_ON_NODE"),
        (slurm(SLURM_GPUS_ON_NODE=None, SLURM_GPUS_PER_NODE="a100:x"), "SLURM_GPUS_PER_NODE='a100:x'"),
        (slurm(SLURM_GPUS_ON_NODE="0"), "SLURM_GPUS_ON_NODE=0 must be >= 1"),
        (slurm(MASTER_PORT="70000"), "MASTER_PORT=70000 must be in [1, 65535]"),
        (slurm(SLURM_JOB_ID="12_3"), "SLURM_JOB_ID='12_3' is not an integer"),
        (slurm(RDZV_ID="a b"), "RDZV_ID='a b'"),
        (slurm(nodeid=1, SLURMD_NODENAME="gpu004"), "SLURMD_NODENAME='gpu004' but SLURM_JOB_NODELIST puts 'gpu002'"),
    ],
)
def test_bad_environment_names_the_variable(env, fragment):
    with pytest.raises(LaunchEnvError) as exc:
        launch_env_from(env)
    assert fragment in str(exc.value)


def test_nodename_mismatch_is_fine_with_explicit_master_addr():
    assert launch_env_from(slurm(nodeid=1, SLURMD_NODENAME="other", MASTER_ADDR="10.0.0.1")).node_rank == 1


def test_shell_output_evaluates_in_bash():
    env = slurm(nodes="gpu[001-002]", nnodes=2, nodeid=1, MASTER_ADDR="node zero's addr")
    out = subprocess.run(
        [sys.executable, "-m", "retnet_train.preflight.launch_env", "env", "--format", "shell"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    script = (
        out + '\nprintf "%s|" "$NNODES" "$NODE_RANK" "$NPROC_PER_NODE" "$WORLD_SIZE" "$MASTER_ADDR" '
        '"$MASTER_PORT" "$RDZV_ID"'
    )
    got = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    assert got == "2|1|8|16|node zero's addr|33456|123456|"


def test_cli_json_and_errors(capsys):
    assert main(["env", "--format", "json"], slurm(nodeid=3)) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["node_rank"], d["world_size"], d["master_addr"]) == (3, 32, "gpu001")
    assert main(["env"], slurm(SLURM_NODEID=None)) == 2
    assert "launch_env: error: SLURM_NODEID is unset" in capsys.readouterr().err
    assert main(["expand", "a[1-2]"], {}) == 0
    assert capsys.readouterr().out.split() == ["a1", "a2"]
    assert main(["expand", "a[2-1]"], {}) == 2
    assert "nodelist: descending range" in capsys.readouterr().err


def test_hostfiles(tmp_path, capsys):
    assert hostfile_lines(slurm(nodes="n[1-2]", nnodes=2), 8) == ["n1 slots=8", "n2 slots=8"]
    with pytest.raises(LaunchEnvError, match="--slots=0"):
        hostfile_lines(slurm(), 0)
    good = tmp_path / "hosts"
    good.write_text("# cluster\nworker-0 slots=8\n\nworker-1   slots=4  # half node\n")
    assert read_hostfile(str(good)) == [("worker-0", 8), ("worker-1", 4)]
    assert main(["check-hostfile", str(good)], {}) == 0
    assert capsys.readouterr().out.split("\n")[:2] == ["worker-0 8", "worker-1 4"]
    for text, fragment in [
        ("worker-0\n", ":1: expected 'HOST slots=N'"),
        ("a slots=0\n", ":1: expected"),
        ("a slots=1\na slots=2\n", ":2: host 'a' listed twice"),
        ("# none\n", "no hosts"),
    ]:
        good.write_text(text)
        with pytest.raises(LaunchEnvError, match=fragment):
            read_hostfile(str(good))
    with pytest.raises(LaunchEnvError, match="No such file"):
        read_hostfile(str(tmp_path / "missing"))


def test_a_hostfile_lines_further_fields_are_left_to_deepspeed_as_its_runner_does(tmp_path):
    """DeepSpeed's runner reads 'HOST slots=N' at a line's start and ignores what follows (MPI's max_slots=)."""
    hosts = tmp_path / "hosts"
    hosts.write_text("worker-0 slots=8 max_slots=8\nworker-1\tslots=4\tmax_slots=4\n")
    assert read_hostfile(str(hosts)) == [("worker-0", 8), ("worker-1", 4)]
    hosts.write_text("worker-0 slots=8x\n")
    with pytest.raises(LaunchEnvError, match=":1: expected 'HOST slots=N'"):
        read_hostfile(str(hosts))


def test_module_does_not_import_torch():
    # It runs on every node before anything else; it must stay light and torch-free.
    code = "import sys, retnet_train.preflight.launch_env; print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )


@pytest.mark.parametrize(
    "env, kwargs, message",
    [
        (slurm(), dict(node_rank=4), "node_rank=4 is out of range for 4 node(s)"),
        (slurm(), dict(nproc_per_node=0), "nproc_per_node=0 must be >= 1"),
        (slurm(NPROC_PER_NODE="x"), {}, "NPROC_PER_NODE='x' is not an integer"),
        (slurm(SLURM_JOB_NUM_NODES=None, SLURM_NNODES="2"), {}, "SLURM_NNODES=2 but SLURM_JOB_NODELIST="),
        (slurm(SLURM_JOB_NODELIST=None, SLURM_NODELIST="a[1-2]"), {}, "SLURM_JOB_NUM_NODES=4 but SLURM_NODELIST="),
    ],
)
def test_bad_arguments_and_fallback_variables_are_named(env, kwargs, message):
    with pytest.raises(LaunchEnvError) as exc:
        launch_env_from(env, **kwargs)
    assert str(exc.value).startswith(message)


def test_fallback_variables_and_a_rendered_rank_skip_the_nodename_check():
    env = slurm(SLURM_JOB_NODELIST=None, SLURM_NODELIST="n[1-2]", SLURM_JOB_NUM_NODES=None, SLURM_NNODES=None)
    e = launch_env_from({**env, "SLURMD_NODENAME": "elsewhere"}, node_rank=1, nproc_per_node=2)
    assert (e.hosts, e.nnodes, e.node_rank, e.nproc_per_node, e.master_addr) == (("n1", "n2"), 2, 1, 2, "n1")


def test_uneven_gpus_per_node_give_the_jobs_total_as_world_size():
    """`--gpus=12` over 2 nodes may give 8 + 4: each node starts one process per GPU it has
    (SLURM_GPUS_ON_NODE; torchrun's c10d rendezvous sums them), and the world size is the job's 12
    (SLURM_GPUS), not nodes x this node's count (16 on one node, 8 on the other)."""
    envs = [
        launch_env_from(slurm(nodes="gpu[001-002]", nnodes=2, nodeid=i, SLURM_GPUS_ON_NODE=n, SLURM_GPUS=total))
        for i, n, total in [(0, "8", "12"), (1, "4", "a100:12")]
    ]
    assert [(e.nproc_per_node, e.world_size) for e in envs] == [(8, 12), (4, 12)]
    assert envs[1].exports()["WORLD_SIZE"] == "12"
    # an explicit count per node is the same on every node: nodes x that count
    assert launch_env_from(slurm(nnodes=4, SLURM_GPUS="12", NPROC_PER_NODE="2")).world_size == 8
    # --gpus-per-node (SLURM_GPUS_PER_NODE) and --gres=gpu:N (SLURM_GPUS_ON_NODE alone) are the same on every node
    assert launch_env_from(slurm(SLURM_GPUS_PER_NODE="a100:8")).world_size == 32


@pytest.mark.parametrize(
    "extra, fragment",
    [
        ({"SLURM_GPUS": "3"}, "SLURM_GPUS=3 GPUs cannot give each of the 4 nodes one"),
        ({"SLURM_GPUS": "12", "SLURM_GPUS_ON_NODE": "16"}, "SLURM_GPUS_ON_NODE=16 but the job has SLURM_GPUS=12"),
        ({"SLURM_GPUS": "a100:x"}, "SLURM_GPUS='a100:x': cannot read a GPU count"),
    ],
)
def test_a_job_gpu_total_that_does_not_fit_is_named(extra, fragment):
    with pytest.raises(LaunchEnvError) as exc:
        launch_env_from(slurm(**extra))
    assert fragment in str(exc.value)
