"""launch/torchrun.sh: --dry-run output on one node and several, Hydra overrides passed through
verbatim, environment variables, bad input."""

from __future__ import annotations

import sys

import pytest
from launch_helpers import OVERRIDES, command_after, env_block, run


def test_torchrun_single_node_dry_run_passes_overrides_verbatim():
    r = run("launch/torchrun.sh", "--dry-run", "--nproc-per-node", "2", *OVERRIDES)
    assert r.returncode == 0, r.stderr
    assert command_after(r.stdout, "# command:") == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "retnet_train.train",
        *OVERRIDES,
    ]
    pre = command_after(r.stdout, "# preflight:")
    assert pre[:3] == [sys.executable, "-m", "retnet_train.preflight"]
    assert pre[pre.index("--") + 1 :] == OVERRIDES
    assert env_block(r.stdout)["WORLD_SIZE"] == "2"


def test_torchrun_multi_node_uses_c10d_and_node0_hosts_the_store():
    for rank in (0, 2):
        r = run(
            "launch/torchrun.sh",
            "--dry-run",
            "--nnodes",
            "3",
            "--node-rank",
            str(rank),
            "--master-addr",
            "gpu001",
            "--master-port",
            "31000",
            "--rdzv-id",
            "job7",
            "--nproc-per-node",
            "4",
            "--checkpoint-dir",
            "/shared/ck",
            "--params",
            "1.3e9",
            "--",
            "--cfg",
            "job",
        )
        assert r.returncode == 0, r.stderr
        cmd = command_after(r.stdout, "# command:")
        assert cmd[3:] == [
            "--nproc_per_node=4",
            "--nnodes=3",
            "--rdzv_backend=c10d",
            "--rdzv_endpoint=gpu001:31000",
            "--rdzv_id=job7",
            f"--rdzv_conf=is_host={int(rank == 0)}",
            "--max_restarts=0",
            "-m",
            "retnet_train.train",
            "--cfg",
            "job",
        ]
        pre = command_after(r.stdout, "# preflight:")
        joined = " ".join(pre)
        expected = f"--nnodes 3 --node-rank {rank} --world-size 12 --shared-id job7 --checkpoint-dir /shared/ck"
        assert f"{expected} --params 1.3e9" in joined
        env = env_block(r.stdout)
        assert (env["NODE_RANK"], env["NNODES"], env["WORLD_SIZE"], env["MASTER_ADDR"]) == (
            str(rank),
            "3",
            "12",
            "gpu001",
        )


def test_torchrun_environment_variables_and_module_option():
    r = run(
        "launch/torchrun.sh",
        "--dry-run",
        "--no-preflight",
        "--module",
        "retnet_train.preflight",
        "--",
        "--dist-check",
        env={"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "2222", "NPROC_PER_NODE": "1"},
    )
    assert r.returncode == 0, r.stderr
    assert "# preflight:" not in r.stdout
    cmd = command_after(r.stdout, "# command:")
    assert "--rdzv_endpoint=10.0.0.5:2222" in cmd and cmd[-3:] == ["-m", "retnet_train.preflight", "--dist-check"]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--bogus"], "unknown option --bogus (program arguments that start with - go after --)"),
        (["--nnodes"], "--nnodes needs a value"),
        (["--nnodes", "2", "--node-rank", "2"], "--node-rank/NODE_RANK must be an integer in [0, 1], got '2'"),
        (["--nnodes", "zero"], "--nnodes/NNODES must be an integer in [1, 100000], got 'zero'"),
        (["--master-port", "99999"], "--master-port/MASTER_PORT must be an integer in [1, 65535]"),
        (["--nproc-per-node", "0"], "--nproc-per-node/NPROC_PER_NODE must be an integer in [1, 1024]"),
        (["--rdzv-id", "a b"], "--rdzv-id/RDZV_ID may only contain"),
        (["--params", "lots"], "--params must be a number like 1.3e9"),
        (["--module", "x;rm"], "--module must be a python module name"),
        (["--slurm"], "SLURM_JOB_NODELIST is unset"),
        (["--vendor", "intel"], "--vendor must be cuda or rocm, got 'intel'"),
        (["--nnodes", "2"], "--nnodes 2 needs --master-addr (or MASTER_ADDR): node 0's address"),
    ],
)
def test_torchrun_bad_input(args, fragment):
    r = (
        run("launch/torchrun.sh", "--dry-run", "--nproc-per-node", "1", *args)
        if "--nproc-per-node" not in args
        else run("launch/torchrun.sh", "--dry-run", *args)
    )
    assert r.returncode != 0
    assert fragment in r.stderr
    assert "# command:" not in r.stdout


def test_a_python_without_the_trainers_packages_is_named(tmp_path):
    """The scripts take PYTHON, else .venv, else python3: a failed preflight under a python that cannot
    import torch and hydra says which python that was and what to do."""
    bare = tmp_path / "bare-python"
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')  # -S: no site-packages
    bare.chmod(0o755)
    r = run("launch/torchrun.sh", "--nproc-per-node", "1", "experiment=tiny_cpu", env={"PYTHON": str(bare)})
    assert r.returncode != 0
    assert f"{bare} cannot import torch and hydra" in r.stderr and "set PYTHON" in r.stderr


def recording_python(tmp_path):
    """A PYTHON that records that it ran and exits 0: a dry run must never start it."""
    log = tmp_path / "python-ran"
    stub = tmp_path / "python"
    stub.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    stub.chmod(0o755)
    return stub, log


@pytest.mark.parametrize(
    "args, env",
    [
        (["--nproc-per-node", "08"], {}),
        (["--nproc-per-node", "4", "--nnodes", "09", "--node-rank", "08", "--master-addr", "gpu001"], {}),
        ([], {"NPROC_PER_NODE": "08", "NNODES": "2", "NODE_RANK": "01", "MASTER_ADDR": "gpu001"}),
    ],
)
def test_a_number_with_a_leading_zero_is_read_in_base_10_and_a_dry_run_starts_nothing(tmp_path, args, env):
    """'08' is 8, as check_int reads it: bash arithmetic would take it for a bad octal number, abort the
    dry run's printing and go on to run the preflight and torchrun."""
    stub, log = recording_python(tmp_path)
    r = run("launch/torchrun.sh", "--dry-run", *args, "experiment=tiny_cpu", env={**env, "PYTHON": str(stub)})
    assert r.returncode == 0, r.stderr
    assert not log.exists(), log.read_text()
    assert "value too great for base" not in r.stderr
    cmd = command_after(r.stdout, "# command:")
    environment = env_block(r.stdout)
    nproc = int(environment["NPROC_PER_NODE"])
    assert f"--nproc_per_node={nproc}" in cmd and environment["NPROC_PER_NODE"] in ("8", "4")
    assert int(environment["WORLD_SIZE"]) == nproc * int(environment["NNODES"])
    if environment["NNODES"] != "1":
        assert f"--nnodes={environment['NNODES']}" in cmd
        rank = environment["NODE_RANK"]
        assert rank in ("8", "1") and f"--rdzv_conf=is_host={int(rank == '0')}" in cmd


def test_options_win_over_slurm_under_slurm():
    """--master-addr, --master-port and --rdzv-id win over what --slurm derives, as they win over the
    variables (a port picked to avoid another job's); --nnodes and --node-rank are SLURM's: refused."""
    slurm = {
        "SLURM_JOB_NODELIST": "gpu[01-02]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NODEID": "1",
        "SLURMD_NODENAME": "gpu02",
        "SLURM_JOB_ID": "77",
        "SLURM_GPUS_ON_NODE": "4",
    }
    r = run("launch/torchrun.sh", "--dry-run", "--slurm", "x=1", env=slurm)
    assert r.returncode == 0, r.stderr
    assert "--rdzv_endpoint=gpu01:10077" in command_after(r.stdout, "# command:")
    options = ["--master-addr", "10.0.0.9", "--master-port", "31000", "--rdzv-id", "run-a"]
    r = run("launch/torchrun.sh", "--dry-run", "--slurm", *options, "x=1", env=slurm)
    assert r.returncode == 0, r.stderr
    cmd = command_after(r.stdout, "# command:")
    assert "--rdzv_endpoint=10.0.0.9:31000" in cmd and "--rdzv_id=run-a" in cmd
    environment = env_block(r.stdout)
    assert (environment["MASTER_ADDR"], environment["MASTER_PORT"], environment["NODE_RANK"]) == (
        "10.0.0.9",
        "31000",
        "1",
    )
    for option in (["--nnodes", "2"], ["--node-rank", "0"]):
        r = run("launch/torchrun.sh", "--dry-run", "--slurm", *option, "x=1", env=slurm)
        assert r.returncode == 2 and "# command:" not in r.stdout
        assert f"{option[0]} cannot be given with --slurm" in r.stderr, r.stderr


def test_under_slurm_with_uneven_gpus_the_preflight_checks_the_jobs_world_size():
    """`--gpus=12` over 2 nodes, 4 of them on this one: torchrun starts 4 processes here, and the world
    size printed and handed to the preflight (its batch check) is the job's 12, not 2 x 4."""
    slurm = {
        "SLURM_JOB_NODELIST": "gpu[01-02]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NODEID": "1",
        "SLURMD_NODENAME": "gpu02",
        "SLURM_JOB_ID": "77",
        "SLURM_GPUS": "12",
        "SLURM_GPUS_ON_NODE": "4",
    }
    r = run("launch/torchrun.sh", "--dry-run", "--slurm", "--checkpoint-dir", "/shared/ck", "x=1", env=slurm)
    assert r.returncode == 0, r.stderr
    assert "--nproc_per_node=4" in command_after(r.stdout, "# command:")
    assert "world size 12" in r.stdout.splitlines()[0]
    environment = env_block(r.stdout)
    assert (environment["NPROC_PER_NODE"], environment["WORLD_SIZE"]) == ("4", "12")
    pre = command_after(r.stdout, "# preflight:")
    assert " ".join(pre[3 : pre.index("--")]).startswith("--nproc-per-node 4 --nnodes 2 --node-rank 1 --world-size 12 ")
