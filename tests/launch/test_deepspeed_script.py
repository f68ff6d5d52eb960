"""launch/deepspeed.sh: --dry-run output from a hostfile and from SLURM, single node, bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
from launch_helpers import OVERRIDES, command_after, fake_slurm, run

# What pdsh's remote shell must hand back verbatim, besides OVERRIDES: a space inside brackets, Hydra's
# quotes with and without a space, an interpolation, backslashes, shell syntax, an empty argument.
REMOTE_OVERRIDES = [
    *OVERRIDES,
    "data.paths=[/a b/c,/d]",
    "run.name='x y'",
    "run.name='x'",
    "checkpoint.dir=${run.dir}/ck",
    'x=a\\b c$`"d\\',
    "y=choice(a,b);z",
    "",
]


def remote_argv(runner_command: list, shell: str) -> list:
    """The arguments that the program after --module gets on a remote node: DeepSpeed's own pdsh
    runner builds the pdsh command from the runner's command line, pdsh joins the remote command into
    one line, and the node's login shell (here `shell`) parses it."""
    from deepspeed.launcher.multinode_runner import PDSHRunner
    from deepspeed.launcher.runner import parse_args

    args = parse_args(runner_command[runner_command.index("deepspeed.launcher.runner") + 1 :])
    pdsh_cmd, _, _ = PDSHRunner(args, "world").get_cmd({}, {"worker-0": [0], "worker-1": [0]})
    program = " ".join(pdsh_cmd[pdsh_cmd.index(args.user_script) + 1 :])
    out = subprocess.run([shell, "-c", f"printf '%s\\0' {program}"], capture_output=True, text=True, check=True)
    return out.stdout.split("\0")[:-1]


def test_deepspeed_hostfile_dry_run(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("worker-0 slots=8\nworker-1 slots=8  # second node\n")
    r = run(
        "launch/deepspeed.sh",
        "--dry-run",
        "--hostfile",
        str(hostfile),
        "--checkpoint-dir",
        "/shared/ck",
        "--master-port",
        "29600",
        "--",
        *REMOTE_OVERRIDES,
        env={"HSA_FORCE_FINE_GRAIN_PCIE": "1"},
    )
    assert r.returncode == 0, r.stderr
    assert (
        "#   node 0: worker-0 slots=8 ranks 0-7" in r.stdout and "#   node 1: worker-1 slots=8 ranks 8-15" in r.stdout
    )
    launcher = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--hostfile",
        str(hostfile),
        "--launcher",
        "pdsh",
        "--force_multi",
        "--master_addr",
        "worker-0",
        "--master_port",
        "29600",
        "--no_local_rank",
        "--module",
    ]
    cmd = command_after(r.stdout, "# command:")
    assert cmd[: len(launcher) + 1] == [*launcher, "retnet_train.train"]
    pre = command_after(r.stdout, "# preflight:")
    assert pre[: len(launcher) + 1] == [*launcher, "retnet_train.preflight"]
    for shell in ("sh", "bash"):
        assert remote_argv(cmd, shell) == REMOTE_OVERRIDES
        pre_args = remote_argv(pre, shell)
        assert pre_args[:2] == ["--from-launcher-env", "--shared-id"]
        assert pre_args[pre_args.index("--checkpoint-dir") + 1] == "/shared/ck"
        assert pre_args[pre_args.index("--") + 1 :] == REMOTE_OVERRIDES
    assert "export HSA_FORCE_FINE_GRAIN_PCIE=1" in r.stdout.splitlines()


def test_deepspeed_from_slurm_and_single_node(tmp_path):
    r = run(
        "launch/deepspeed.sh",
        "--dry-run",
        "--slurm",
        "model=tiny",
        env={**fake_slurm("gpu[01-04]", 4), "TMPDIR": str(tmp_path)},
    )
    assert r.returncode == 0, r.stderr
    assert "#   node 3: gpu04 slots=8 ranks 24-31" in r.stdout
    assert not list(tmp_path.iterdir())  # a dry run writes no hostfile
    cmd = command_after(r.stdout, "# command:")
    assert cmd[cmd.index("--hostfile") + 1] == f"{tmp_path}/retnet-hostfile-4242" and "gpu01" in cmd
    r = run("launch/deepspeed.sh", "--dry-run", "--num-gpus", "2", "model=tiny")
    assert r.returncode == 0, r.stderr
    cmd = command_after(r.stdout, "# command:")
    assert cmd == [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--master_port",
        "29500",
        "--num_gpus",
        "2",
        "--no_local_rank",
        "--module",
        "retnet_train.train",
        "model=tiny",
    ]


@pytest.mark.parametrize(
    "hostfile_text, args, fragment",
    [
        (None, [], "No such file or directory"),
        ("worker-0\n", [], ":1: expected 'HOST slots=N'"),
        ("w slots=1\n", ["--launcher", "ssh"], "--launcher must be pdsh, openmpi"),
        ("w slots=1\n", ["--num-gpus", "0"], "--num-gpus must be an integer in [1, 1024]"),
        ("w slots=1\n", ["--slurm"], "--slurm and --hostfile exclude each other"),
        ("w slots=1\n", ["-x"], "unknown option -x"),
        ("w slots=1\n", ["--include", "other"], "--include other names no host of"),
        ("w slots=1\nv slots=1\n", ["--num-nodes", "3"], "--num-nodes 3: the hostfile lists 2 hosts"),
        ("w slots=1\nv slots=1\n", ["--num-nodes", "1", "--include", "v"], "--num-nodes and --include exclude"),
    ],
)
def test_deepspeed_bad_input(tmp_path, hostfile_text, args, fragment):
    hostfile = tmp_path / "hosts"
    if hostfile_text is not None:
        hostfile.write_text(hostfile_text)
    env = fake_slurm("n1", 1) if "--slurm" in args else {}
    r = run("launch/deepspeed.sh", "--dry-run", "--hostfile", str(hostfile), *args, "model=tiny", env=env)
    assert r.returncode != 0
    assert fragment in r.stderr, r.stderr


@pytest.mark.parametrize("include, first", [("worker-1", "worker-1"), ("worker-2:0,1@worker-1", "worker-1")])
def test_deepspeed_master_is_the_first_host_include_keeps(tmp_path, include, first):
    """DeepSpeed runs the hosts --include names in the hostfile's order: the rendezvous is on the first
    of those (the hostfile's first host runs nothing there)."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text("worker-0 slots=8\nworker-1 slots=8\nworker-2 slots=8\n")
    r = run("launch/deepspeed.sh", "--dry-run", "--hostfile", str(hostfile), "--include", include, "model=tiny")
    assert r.returncode == 0, r.stderr
    cmd = command_after(r.stdout, "# command:")
    assert cmd[cmd.index("--master_addr") + 1] == first


def test_deepspeed_from_slurm_takes_the_jobs_port_so_two_jobs_on_one_node_do_not_collide(tmp_path):
    """Inside SLURM the rendezvous port is the job's (10000 + SLURM_JOB_ID % 50000, as torchrun.sh --slurm
    takes it): two jobs sharing a node would both bind 29500 there. --master-port and MASTER_PORT win."""

    def master_port(*args, **env):
        r = run(
            "launch/deepspeed.sh",
            "--dry-run",
            "--slurm",
            *args,
            "model=tiny",
            env={**fake_slurm("gpu[01-02]", 2), **env},
        )
        assert r.returncode == 0, r.stderr
        cmd = command_after(r.stdout, "# command:")
        assert f"MASTER_PORT={cmd[cmd.index('--master_port') + 1]}" in r.stdout
        return cmd[cmd.index("--master_port") + 1]

    assert master_port() == "14242"
    assert master_port(SLURM_JOB_ID="4243") == "14243"
    assert master_port("--num-gpus", "4", SLURM_GPUS_ON_NODE="") == "14242"
    assert master_port("--master-port", "31000") == "31000"
    assert master_port(MASTER_PORT="2222") == "2222"


def test_deepspeed_from_slurm_dry_run_prints_the_hostfile_its_command_reads(tmp_path):
    """A dry run writes no hostfile, but its command reads one: pasted without it, DeepSpeed would train
    on this node alone. The dry run prints the line that writes it, before the commands."""
    r = run(
        "launch/deepspeed.sh",
        "--dry-run",
        "--slurm",
        "model=tiny",
        env={**fake_slurm("gpu[01-02]", 2), "TMPDIR": str(tmp_path)},
    )
    assert r.returncode == 0, r.stderr
    assert not list(tmp_path.iterdir())
    lines = r.stdout.splitlines()
    before_commands = [line for line in lines[: lines.index("# preflight:")] if not line.startswith("#")]
    pasted = subprocess.run(["bash", "-c", "\n".join(before_commands)], capture_output=True, text=True)
    assert pasted.returncode == 0, pasted.stderr
    cmd = command_after(r.stdout, "# command:")
    hostfile = cmd[cmd.index("--hostfile") + 1]
    assert open(hostfile).read() == "gpu01 slots=8\ngpu02 slots=8\n"


def test_deepspeed_from_slurm_refuses_a_hostfile_of_equal_slots_where_nodes_have_different_gpus(tmp_path):
    """`--gpus=12` over 2 nodes (8 + 4): a hostfile of slots=8 on both would start 8 processes on the
    4-GPU node. The GPUs per node are not known from the batch host: the script stops, naming a way out;
    --num-gpus (the same count on every node, chosen) is taken as it is."""
    env = {**fake_slurm("gpu[01-02]", 2), "SLURM_GPUS": "12", "TMPDIR": str(tmp_path)}
    r = run("launch/deepspeed.sh", "--dry-run", "--slurm", "model=tiny", env=env)
    assert r.returncode == 2 and "# command:" not in r.stdout
    assert "SLURM_GPUS=12 over 2 nodes is not 8 on each" in r.stderr and "--hostfile" in r.stderr, r.stderr
    r = run("launch/deepspeed.sh", "--dry-run", "--slurm", "--num-gpus", "4", "model=tiny", env=env)
    assert r.returncode == 0, r.stderr
    assert "#   node 1: gpu02 slots=4 ranks 4-7" in r.stdout
