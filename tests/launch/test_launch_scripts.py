"""launch/*.sh and launch/slurm/*.sbatch: --dry-run output for fake SLURM environments (1 and 4
nodes, NVIDIA and ROCm), Hydra overrides passed through verbatim, bad input, shellcheck."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = [
    "launch/torchrun.sh",
    "launch/deepspeed.sh",
    "launch/slurm/nvidia.sbatch",
    "launch/slurm/rocm.sbatch",
    "launch/slurm/common.sh",
]
# Overrides that break naive quoting: spaces, quotes, brackets, globs, $, leading +/~.
OVERRIDES = [
    "model=6.7b",
    "experiment=retnet_6.7b_8k",
    "train.name=my run",
    "+data.mix=[0.5,0.5]",
    "~optim.foo",
    "note='it''s'",
    "glob=*",
    "path=$HOME/x",
    'q="a b"',
]
ROCM_ONLY = ("HSA_FORCE_FINE_GRAIN_PCIE", "MIOPEN_USER_DB_PATH", "PYTORCH_ROCM_ARCH")


def run(script: str, *args: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    base = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/root"),
        "USER": "alice",
        "PYTHON": sys.executable,
    }
    base.update(env or {})
    return subprocess.run(
        ["bash", str(ROOT / script) if not os.path.isabs(script) else script, *args],
        cwd=cwd,
        env=base,
        capture_output=True,
        text=True,
        timeout=120,
    )


def fake_slurm(nodes: str, nnodes: int, **extra: str) -> dict:
    return {
        "SLURM_JOB_NODELIST": nodes,
        "SLURM_JOB_NUM_NODES": str(nnodes),
        "SLURM_NNODES": str(nnodes),
        "SLURM_NODEID": "0",
        "SLURM_JOB_ID": "4242",
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_CPUS_PER_TASK": "64",
        "SLURM_SUBMIT_DIR": str(ROOT),
        **extra,
    }


def command_after(text: str, header: str) -> list[str]:
    lines = text.splitlines()
    return shlex.split(lines[lines.index(header) + 1])


def env_block(section: str) -> dict[str, str]:
    lines = section.splitlines()
    start, end = (
        lines.index("# environment:") + 1,
        next(i for i, line in enumerate(lines) if line in ("# preflight:", "# command:")),
    )
    out = {}
    for line in lines[start:end]:
        k, v = line.split("=", 1)
        (out[k],) = shlex.split(v) or [""]
    return out


def node_sections(text: str) -> list[str]:
    parts = re.split(r"^# ---- node \d+: .*$", text, flags=re.M)
    return parts[1:]


# ---------------------------------------------------------------- torchrun.sh


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
        assert f"--nnodes 3 --node-rank {rank} --shared-id job7 --checkpoint-dir /shared/ck --params 1.3e9" in joined
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


# ---------------------------------------------------------------- SLURM


@pytest.mark.parametrize("vendor", ["nvidia", "rocm"])
@pytest.mark.parametrize(
    "nodes, hosts", [("dgx01", ["dgx01"]), ("gpu[001-002,007],cpu1", ["gpu001", "gpu002", "gpu007", "cpu1"])]
)
def test_sbatch_dry_run(vendor, nodes, hosts):
    n = len(hosts)
    extra = (
        {"ROCR_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7", "HIP_VISIBLE_DEVICES": "0,1", "CUDA_VISIBLE_DEVICES": "0,1"}
        if vendor == "rocm"
        else {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
    )
    args = (["--gpu", "mi250x"] if vendor == "rocm" else []) + ["--checkpoint-dir", "/lustre/ck", *OVERRIDES]
    r = run(
        f"launch/slurm/{vendor}.sbatch", "--dry-run", *args, env={**fake_slurm(nodes, n), **extra, "NCCL_DEBUG": "INFO"}
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"# {vendor}.sbatch dry run: job 4242, {n} node(s): {' '.join(hosts)}")
    step = command_after(r.stdout, "# srun step (run once from the batch host):")
    assert step[:4] == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=64"]
    assert step[4:8] == ["bash", str(ROOT / "launch/torchrun.sh"), "--slurm", "--checkpoint-dir"]
    assert "--require-gpu" in step and step[step.index("--") + 1 :] == OVERRIDES

    sections = node_sections(r.stdout)
    assert len(sections) == n
    for i, sec in enumerate(sections):
        env = env_block(sec)
        assert (env["NODE_RANK"], env["NNODES"], env["NPROC_PER_NODE"], env["WORLD_SIZE"]) == (
            str(i),
            str(n),
            "8",
            str(8 * n),
        )
        assert env["MASTER_ADDR"] == hosts[0] and env["MASTER_PORT"] == "14242"
        assert env["NCCL_DEBUG"] == "INFO"  # what the user set wins over the script's default
        assert env["TRITON_CACHE_DIR"] == "/tmp/triton-cache-alice-4242" and env["OMP_NUM_THREADS"] == "8"
        if vendor == "rocm":
            assert env["ROCR_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"
            assert "HIP_VISIBLE_DEVICES" not in env and "CUDA_VISIBLE_DEVICES" not in env
            assert env["HSA_FORCE_FINE_GRAIN_PCIE"] == "1" and env["PYTORCH_ROCM_ARCH"] == "gfx90a"
            assert env["MIOPEN_USER_DB_PATH"] == "/tmp/miopen-alice-4242"
            assert "PYTORCH_CUDA_ALLOC_CONF" not in env
        else:
            assert env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"
            assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
            assert not set(ROCM_ONLY) & set(env)
        cmd = command_after(sec, "# command:")
        assert cmd[cmd.index("-m", 3) :] == ["-m", "retnet_train.train", *OVERRIDES]
        if n == 1:
            assert "--standalone" in cmd and not any(c.startswith("--rdzv") for c in cmd)
        else:
            assert f"--rdzv_endpoint={hosts[0]}:14242" in cmd and "--rdzv_id=4242" in cmd
            assert f"--rdzv_conf=is_host={int(i == 0)}" in cmd and f"--nnodes={n}" in cmd
        pre = command_after(sec, "# preflight:")
        stack = "rocm" if vendor == "rocm" else "cuda"
        assert " ".join(pre[3 : pre.index("--")]) == (
            f"--nproc-per-node 8 --nnodes {n} --node-rank {i} --shared-id 4242 "
            f"--checkpoint-dir /lustre/ck --require-gpu --vendor {stack}"
        )
        assert pre[pre.index("--") + 1 :] == OVERRIDES


def test_rocm_mi300x_and_slingshot_settings():
    r = run(
        "launch/slurm/rocm.sbatch",
        "--dry-run",
        "--gpu",
        "mi300x",
        "--slingshot",
        "--allow-cpu",
        "model=tiny",
        env=fake_slurm("nid[000001-000002]", 2),
    )
    assert r.returncode == 0, r.stderr
    env = env_block(node_sections(r.stdout)[1])
    assert (env["PYTORCH_ROCM_ARCH"], env["NCCL_MIN_NCHANNELS"]) == ("gfx942", "112")
    assert (env["FI_PROVIDER"], env["NCCL_NET_GDR_LEVEL"], env["FI_CXI_ATS"]) == ("cxi", "3", "0")
    assert env["NCCL_SOCKET_IFNAME"] == "hsn0,hsn1,hsn2,hsn3"
    step = command_after(r.stdout, "# srun step (run once from the batch host):")
    assert "--require-gpu" not in step and "--vendor" not in step


@pytest.mark.parametrize(
    "script, args, env, fragment",
    [
        ("nvidia", ["model=x"], {}, "SLURM_JOB_NODELIST is unset: submit with sbatch"),
        ("rocm", ["--gpu", "h100"], fake_slurm("n1", 1), "--gpu must be mi200, mi250x or mi300x, got 'h100'"),
        ("nvidia", ["--gpu", "mi300x"], fake_slurm("n1", 1), "--gpu is an option of rocm.sbatch"),
        ("nvidia", ["--frobnicate"], fake_slurm("n1", 1), "unknown option --frobnicate"),
        ("nvidia", [], fake_slurm("n[1-2]", 3), "SLURM_JOB_NUM_NODES=3 but SLURM_JOB_NODELIST='n[1-2]' lists 2 hosts"),
        ("rocm", [], fake_slurm("n[1-2", 2), "SLURM_JOB_NODELIST: unclosed '['"),
        ("nvidia", [], {**fake_slurm("n1", 1), "SLURM_GPUS_ON_NODE": ""}, "NPROC_PER_NODE is unset"),
    ],
)
def test_sbatch_bad_input(script, args, env, fragment):
    r = run(f"launch/slurm/{script}.sbatch", "--dry-run", *args, env=env)
    assert r.returncode != 0
    assert fragment in r.stderr, r.stderr


def test_sbatch_finds_the_repository_from_a_spool_copy(tmp_path):
    # sbatch runs a copy of the script from /var/spool/...: the repository comes from SLURM_SUBMIT_DIR.
    spool = tmp_path / "job4242"
    spool.mkdir()
    shutil.copy(ROOT / "launch/slurm/nvidia.sbatch", spool / "slurm_script")
    r = run(str(spool / "slurm_script"), "--dry-run", "model=tiny", env=fake_slurm("n1", 1), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"bash {ROOT}/launch/torchrun.sh --slurm" in r.stdout
    env = {k: v for k, v in fake_slurm("n1", 1).items() if k != "SLURM_SUBMIT_DIR"}
    r = run(str(spool / "slurm_script"), "--dry-run", env=env, cwd=tmp_path)
    assert r.returncode == 2 and "cannot find the retnet-train repository" in r.stderr


# ---------------------------------------------------------------- deepspeed.sh


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
        *OVERRIDES,
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
        "--master_addr",
        "worker-0",
        "--master_port",
        "29600",
        "--no_local_rank",
        "--module",
    ]
    assert command_after(r.stdout, "# command:") == [*launcher, "retnet_train.train", *OVERRIDES]
    pre = command_after(r.stdout, "# preflight:")
    assert pre[: len(launcher) + 2] == [*launcher, "retnet_train.preflight", "--from-launcher-env"]
    assert pre[pre.index("--") + 1 :] == OVERRIDES and "--checkpoint-dir" in pre
    assert "HSA_FORCE_FINE_GRAIN_PCIE=1" in r.stdout.splitlines()


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


# ---------------------------------------------------------------- all scripts


@pytest.mark.parametrize("script", [s for s in SCRIPTS if not s.endswith("common.sh")])
def test_help(script):
    r = run(script, "--help", env=fake_slurm("n1", 1))
    assert r.returncode == 0, r.stderr
    assert "--dry-run" in r.stdout and "--checkpoint-dir" in r.stdout


def test_scripts_are_strict_bash():
    for s in SCRIPTS:
        text = (ROOT / s).read_text()
        if not s.endswith("common.sh"):
            assert text.startswith("#!/usr/bin/env bash\n"), s
            assert "\nset -euo pipefail\n" in text, s
            assert os.access(ROOT / s, os.X_OK), f"{s} is not executable"


def test_shellcheck_clean():
    exe = shutil.which("shellcheck")
    if exe is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("shellcheck is not installed but CI=true: CI must install it (apt-get install -y shellcheck)")
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck); CI=true makes this a failure")
    r = subprocess.run([exe, "-x", "--severity=style", *SCRIPTS], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_srun_step_gets_the_nodes_cpus_without_cpus_per_task():
    # An --exclusive job without --cpus-per-task: srun would give the task one CPU (Slurm >= 22.05).
    env = {k: v for k, v in fake_slurm("n[1-2]", 2).items() if k != "SLURM_CPUS_PER_TASK"}
    r = run("launch/slurm/nvidia.sbatch", "--dry-run", "model=tiny", env={**env, "SLURM_CPUS_ON_NODE": "128"})
    assert r.returncode == 0, r.stderr
    assert "--cpus-per-task=128" in command_after(r.stdout, "# srun step (run once from the batch host):")
    assert env_block(node_sections(r.stdout)[0])["OMP_NUM_THREADS"] == "16"
    r = run("launch/slurm/nvidia.sbatch", "--dry-run", "model=tiny", env=env)
    assert r.returncode == 0, r.stderr
    assert not any(
        a.startswith("--cpus-per-task") for a in command_after(r.stdout, "# srun step (run once from the batch host):")
    )


REQUEUE_SRUN = """#!/usr/bin/env bash
# stand-in srun: the trainer's ranks on the batch host wrote their status; srun's own is the tasks' highest
echo "$FAKE_STATUS" > "$RETNET_EXIT_STATUS_FILE"
exit "$FAKE_SRUN_RC"
"""


@pytest.mark.parametrize("status,srun_rc,expect", [("75", "137", 75), ("0", "0", 0), ("1", "1", 1)])
def test_sbatch_requeues_the_job_only_when_the_trainer_stopped_on_a_signal(tmp_path, status, srun_rc, expect):
    # 75: a signal (sbatch --signal=USR1@600, SIGTERM) made the trainer save and stop; srun's status may
    # be 128 + 9 for a task it killed after another one ended.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "srun").write_text(REQUEUE_SRUN)
    (bindir / "scontrol").write_text('#!/usr/bin/env bash\necho "$@" >> "$SCONTROL_LOG"\n')
    for tool in ("srun", "scontrol"):
        (bindir / tool).chmod(0o755)
    log = tmp_path / "scontrol.log"
    env = {
        **fake_slurm("n1", 1),
        "PATH": f"{bindir}:{os.environ['PATH']}",
        "TMPDIR": str(tmp_path),
        "FAKE_STATUS": status,
        "FAKE_SRUN_RC": srun_rc,
        "SCONTROL_LOG": str(log),
    }
    r = run("launch/slurm/nvidia.sbatch", "model=tiny", env=env)
    assert r.returncode == expect, r.stderr
    if expect == 75:
        assert log.read_text().split() == ["requeue", "4242"]
        assert "requeueing job 4242 to resume" in r.stderr
    else:
        assert not log.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p != log) == ["bin"]  # the status file is removed
