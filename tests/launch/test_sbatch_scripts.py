"""launch/slurm/*.sbatch: --dry-run output for fake SLURM environments (1 and 4 nodes, NVIDIA and
ROCm), bad input, a spool copy of the script, the srun step's CPUs, requeueing after a signal."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from launch_helpers import OVERRIDES, ROOT, command_after, env_block, fake_slurm, node_sections, run

ROCM_ONLY = ("HSA_FORCE_FINE_GRAIN_PCIE", "MIOPEN_USER_DB_PATH", "PYTORCH_ROCM_ARCH")


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
        assert env["PYTHONPATH"] == str(ROOT)  # the sbatch script and torchrun.sh both put it there: once
        assert env["PYTHONUNBUFFERED"] == "1"  # logs reach the .out file as they happen
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
            f"--nproc-per-node 8 --nnodes {n} --node-rank {i} --world-size {8 * n} --shared-id 4242 "
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


@pytest.mark.parametrize("vendor", ["nvidia", "rocm"])
def test_sbatch_defaults_nccl_debug_to_warn(vendor):
    """Unset by the user, NCCL_DEBUG is WARN on every node: a failing collective prints its reason."""
    r = run(f"launch/slurm/{vendor}.sbatch", "--dry-run", "--allow-cpu", "model=tiny", env=fake_slurm("n[1-2]", 2))
    assert r.returncode == 0, r.stderr
    assert [env_block(sec)["NCCL_DEBUG"] for sec in node_sections(r.stdout)] == ["WARN", "WARN"]


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


@pytest.mark.parametrize("vendor", ["nvidia", "rocm"])
def test_a_nodes_dry_run_environment_pasted_into_a_shell_reaches_its_commands(vendor):
    """The sbatch script sets these for the srun step; a node's lines, pasted into a new shell before its
    preflight and torchrun commands, must hand them to those programs (exported, not shell variables)."""
    r = run(f"launch/slurm/{vendor}.sbatch", "--dry-run", "--allow-cpu", "model=tiny", env=fake_slurm("n[1-2]", 2))
    assert r.returncode == 0, r.stderr
    section = node_sections(r.stdout)[1]
    lines = section.splitlines()
    pasted = lines[lines.index("# environment:") + 1 : lines.index("# preflight:")]
    names = ["NODE_RANK", "NCCL_DEBUG", "TRITON_CACHE_DIR", "OMP_NUM_THREADS", "PYTHONPATH"]
    script = "\n".join([*pasted, f"env | grep -E '^({'|'.join(names)})=' | sort"])
    seen = subprocess.run(["bash", "-c", script], env={"PATH": os.environ["PATH"]}, capture_output=True, text=True)
    assert seen.returncode == 0, seen.stderr
    assert seen.stdout.split() == sorted(
        [
            "NODE_RANK=1",
            "NCCL_DEBUG=WARN",
            "TRITON_CACHE_DIR=/tmp/triton-cache-alice-4242",
            "OMP_NUM_THREADS=8",
            f"PYTHONPATH={ROOT}",
        ]
    )


def test_a_failed_requeue_still_ends_the_job_with_75(tmp_path):
    """The checkpoint is saved whether or not `scontrol requeue` works: the job ends with the trainer's
    75 ('run the same command to resume'), not 2 ('bad options or preflight failed, nothing started')."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "srun").write_text(REQUEUE_SRUN)
    (bindir / "scontrol").write_text(
        '#!/usr/bin/env bash\necho "scontrol: error: Access/permission denied" >&2\nexit 1\n'
    )
    for tool in ("srun", "scontrol"):
        (bindir / tool).chmod(0o755)
    env = {
        **fake_slurm("n1", 1),
        "PATH": f"{bindir}:{os.environ['PATH']}",
        "TMPDIR": str(tmp_path),
        "FAKE_STATUS": "75",
        "FAKE_SRUN_RC": "1",
    }
    r = run("launch/slurm/nvidia.sbatch", "model=tiny", env=env)
    assert r.returncode == 75, r.stderr
    assert "scontrol requeue 4242 failed: submit the same command again to resume" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin"]


def test_sbatch_dry_run_with_uneven_gpus_gives_every_node_the_jobs_world_size():
    """`--gpus=12` over 2 nodes: every node's preflight checks the batch for 12 ranks, and the dry run
    says that the nodes' process counts are their own (it renders them with the batch host's)."""
    env = {**fake_slurm("gpu[01-02]", 2), "SLURM_GPUS": "12"}
    r = run("launch/slurm/nvidia.sbatch", "--dry-run", "--checkpoint-dir", "/lustre/ck", "model=tiny", env=env)
    assert r.returncode == 0, r.stderr
    for sec in node_sections(r.stdout):
        assert env_block(sec)["WORLD_SIZE"] == "12"
        assert "--world-size 12" in " ".join(command_after(sec, "# preflight:"))
        assert "each starts one process per GPU it has" in sec


def test_rocm_device_masks_are_cleared_where_each_nodes_task_starts():
    """srun sets the device masks again in every task it starts (SLURM's gres plugin: ROCR_VISIBLE_DEVICES,
    and CUDA_VISIBLE_DEVICES with the same global ids); clearing them on the batch host alone leaves them
    on the nodes. The per-node command of rocm.sbatch's srun step, run in such a task's environment,
    keeps ROCR_VISIBLE_DEVICES only; without ROCR it leaves CUDA_VISIBLE_DEVICES alone."""
    r = run("launch/slurm/rocm.sbatch", "--dry-run", "--allow-cpu", "model=tiny", env=fake_slurm("n[1-2]", 2))
    assert r.returncode == 0, r.stderr
    step = command_after(r.stdout, "# srun step (run once from the batch host):")
    per_node = step[step.index("bash") + 1 :]  # what srun runs on every node
    masks = {"ROCR_VISIBLE_DEVICES": "0,1,2,3", "HIP_VISIBLE_DEVICES": "0,1,2,3", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    task = {**fake_slurm("n[1-2]", 2), "SLURM_NODEID": "1", "SLURMD_NODENAME": "n2", **masks}
    r = run(per_node[0], "--dry-run", *per_node[1:], env=task)
    assert r.returncode == 0, r.stderr
    env = env_block(r.stdout)
    assert env["ROCR_VISIBLE_DEVICES"] == "0,1,2,3"
    assert "HIP_VISIBLE_DEVICES" not in env and "CUDA_VISIBLE_DEVICES" not in env
    r = run(per_node[0], "--dry-run", *per_node[1:], env={**task, "ROCR_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr
    assert env_block(r.stdout)["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"


PER_NODE_SRUN = """#!/usr/bin/env bash
# stand-in srun: the step's per-node command, as node 1's task runs it (4 GPUs there, 8 on the batch host), in
# the environment the sbatch script hands srun; --dry-run prints what that node would start
while [[ "$1" == -* ]]; do shift; done
exec env SLURM_NODEID=1 SLURMD_NODENAME=gpu02 SLURM_GPUS_ON_NODE=4 "$1" "$2" --dry-run "${@:3}"
"""


@pytest.mark.parametrize("vendor", ["nvidia", "rocm"])
def test_each_node_works_out_omp_threads_from_its_own_cpus_and_gpus(tmp_path, vendor):
    """OMP_NUM_THREADS = the task's CPUs / this node's GPUs, worked out in each node's task (torchrun.sh
    --slurm): the batch host worked it out from its own 8 GPUs, and srun handed that to every node, so a node
    with 4 GPUs (--gpus=12 over 2 nodes) ran 8 threads per process on 64 CPUs, half of them idle."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "srun").write_text(PER_NODE_SRUN)
    (bindir / "srun").chmod(0o755)
    env = {**fake_slurm("gpu[01-02]", 2), "SLURM_GPUS": "12", "PATH": f"{bindir}:{os.environ['PATH']}"}
    env["TMPDIR"] = str(tmp_path)
    r = run(f"launch/slurm/{vendor}.sbatch", "--allow-cpu", "model=tiny", env=env)
    assert r.returncode == 0, r.stderr
    assert (env_block(r.stdout)["NPROC_PER_NODE"], env_block(r.stdout)["OMP_NUM_THREADS"]) == ("4", "16")
    r = run(f"launch/slurm/{vendor}.sbatch", "--allow-cpu", "model=tiny", env={**env, "SLURM_CPUS_PER_TASK": "6"})
    assert r.returncode == 0, r.stderr
    assert env_block(r.stdout)["OMP_NUM_THREADS"] == "1"  # at least one thread per process
    r = run(f"launch/slurm/{vendor}.sbatch", "--allow-cpu", "model=tiny", env={**env, "OMP_NUM_THREADS": "3"})
    assert r.returncode == 0, r.stderr
    assert env_block(r.stdout)["OMP_NUM_THREADS"] == "3"  # what the user set wins
    # the dry run renders every node with the batch host's 8 GPUs: 64 / 8
    r = run(f"launch/slurm/{vendor}.sbatch", "--dry-run", "--allow-cpu", "model=tiny", env=env)
    assert r.returncode == 0, r.stderr
    assert [env_block(sec)["OMP_NUM_THREADS"] for sec in node_sections(r.stdout)] == ["8", "8"]
