"""The multi-node path for real: two "nodes" (two launch/torchrun.sh processes, one worker each)
meet through c10d rendezvous on 127.0.0.1 and talk over gloo on CPU. Each node also runs the
preflight, whose shared-checkpoint-dir handshake goes through the common tmp dir."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from launch_helpers import ROOT, run_together
from process_tree import descendants

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_node(rank: int, port: int, *args: str) -> list[str]:
    """launch/torchrun.sh as node `rank` of two that meet on 127.0.0.1:`port`."""
    return [
        "bash",
        str(ROOT / "launch/torchrun.sh"),
        "--nnodes",
        "2",
        "--node-rank",
        str(rank),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port),
        *args,
    ]


def launch_two_nodes(
    cwd: Path, node_args: list[str], prog_args: list[str], timeout: float = 400, env_extra: dict | None = None
) -> list[tuple[int, str]]:
    port = free_port()
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK"):
        env.pop(k, None)
    commands = [
        torchrun_node(rank, port, "--rdzv-id", f"test-{port}", "--nproc-per-node", "1", *node_args, "--", *prog_args)
        for rank in (1, 0)  # node 1 first: it must wait for node 0's store and marker
    ]
    rcs, outs = run_together(commands, cwd=cwd, env=env, timeout=timeout)
    return list(zip(rcs, outs))[::-1]  # node 0, node 1


def test_two_nodes_rendezvous_and_all_reduce(tmp_path):
    ckpt = tmp_path / "ckpt"
    (rc0, out0), (rc1, out1) = launch_two_nodes(
        tmp_path,
        ["--checkpoint-dir", str(ckpt), "--params", "1e6", "--module", "retnet_train.preflight"],
        ["--dist-check"],
    )
    assert (rc0, rc1) == (0, 0), out0 + "\n----\n" + out1
    assert f"checkpoint dir {ckpt} is shared by all 2 nodes" in out0
    assert f"checkpoint dir {ckpt} is shared with node 0" in out1
    # Exactly one worker is global rank 0 and prints; 1 + 2 = 3 proves both took part.
    report = [line for line in (out0 + out1).splitlines() if line.startswith("dist-check ok:")]
    assert len(report) == 1
    assert "backend=gloo world_size=2 all_reduce=3" in report[0]


def test_preflight_failure_on_one_node_stops_both(tmp_path):
    # Node 1's checkpoint dir cannot be created: both nodes fail in the preflight, nothing starts.
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    port = free_port()
    env = {**os.environ, "PYTHON": sys.executable}
    commands = [
        torchrun_node(
            r,
            port,
            "--nproc-per-node",
            "1",
            "--checkpoint-dir",
            str(tmp_path / "ck" if r == 0 else blocker / "ck"),
            "--module",
            "retnet_train.preflight",
            "--",
            "--dist-check",
        )
        for r in (0, 1)
    ]
    rcs, outs = run_together(commands, cwd=tmp_path, env={**env, "PREFLIGHT_SHARED_TIMEOUT": "5"}, timeout=300)
    assert rcs == [2, 2], outs
    assert "preflight failed on node 1" in outs[1] and "not writable: Not a directory" in outs[1]
    assert "preflight failed on node 0" in outs[0] and "did not acknowledge" in outs[0]
    assert not any("dist-check ok" in o for o in outs)


def ensure_sample_data() -> None:
    """`make data`: the sample corpus the tiny_cpu experiment reads (built once, reused)."""
    if (ROOT / "data/sample/shards/manifest.json").is_file() and (ROOT / "data/sample/tokenizer.model").is_file():
        return
    subprocess.run(
        [sys.executable, "-m", "data_prep.sample_corpus", "--out", "data/sample"],
        cwd=ROOT,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        timeout=600,
    )


def test_two_nodes_train_a_few_steps(tmp_path):
    # The real trainer behind the real launch path: each "node" runs its preflight (which composes
    # the trainer config and finds the checkpoint dir run.dir/checkpoints, shared by both), then
    # torchrun with c10d; the two ranks train 3 steps together and checkpoint.
    ensure_sample_data()
    run = tmp_path / "run"
    # small batches and one validation batch: the launch path is under test, not the model (~7 s less)
    overrides = [
        "experiment=tiny_cpu",
        "model=tiny",
        "train.max_steps=3",
        "train.micro_batch_size=2",
        "train.global_batch_tokens=1024",
        "train.eval_batches=1",
        f"run.dir={run}",
    ]
    (rc0, out0), (rc1, out1) = launch_two_nodes(ROOT, [], overrides, env_extra={"WANDB_MODE": "disabled"})
    both = out0 + "\n----\n" + out1
    # each node's own tail: when one node fails first, the other's rendezvous errors fill the end
    assert (rc0, rc1) == (0, 0), f"node 0 (rc {rc0}):\n{out0[-4000:]}\n---- node 1 (rc {rc1}):\n{out1[-4000:]}"
    ckpt = run / "checkpoints"
    assert f"checkpoint dir {ckpt} is shared by all 2 nodes" in out0
    assert f"checkpoint dir {ckpt} is shared with node 0" in out1
    assert "world 2 |" in both and "done at step 3" in both
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(rec.get("step") == 3 and "loss" in rec for rec in steps)
    tag = ckpt / "step_00000003"
    assert (tag / "COMPLETE").exists()
    assert (tag / "rng_rank0.pt").exists() and (tag / "rng_rank1.pt").exists()  # both ranks took part


def test_deepspeed_launcher_runs_preflight_then_program(tmp_path):
    # launch/deepspeed.sh for real on this node: the preflight goes through the DeepSpeed launcher
    # (--from-launcher-env: node rank/count from CROSS_RANK/CROSS_SIZE), then the program, with
    # --no_local_rank so nothing is appended to the program's arguments.
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run(
        [
            "bash",
            str(ROOT / "launch/deepspeed.sh"),
            "--num-gpus",
            "1",
            "--master-port",
            str(free_port()),
            "--checkpoint-dir",
            str(tmp_path / "ck"),
            "--params",
            "1e6",
            "--module",
            "retnet_train.preflight",
            "--",
            "--dist-check",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    assert "--from-launcher-env" in out and "preflight passed on node 0" in out
    assert f"checkpoint dir {tmp_path / 'ck'} is writable" in out
    assert "dist-check ok: backend=gloo world_size=1 all_reduce=1" in out


FAKE_SRUN = r"""#!/usr/bin/env bash
# Test stand-in for srun: one task per host of SLURM_JOB_NODELIST, all on this machine, each with
# its SLURM_NODEID and SLURMD_NODENAME as slurmd would set them.
set -euo pipefail
while [[ $# -gt 0 && "$1" == --* ]]; do echo "$1" >> "$SRUN_LOG"; shift; done
mapfile -t hosts < <("$PYTHON" -m retnet_train.preflight.launch_env expand "$SLURM_JOB_NODELIST")
pids=()
for i in "${!hosts[@]}"; do
  SLURM_NODEID="$i" SLURMD_NODENAME="${hosts[$i]}" "$@" > "$SRUN_LOG.node$i" 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
exit "$rc"
"""


def test_sbatch_script_end_to_end_under_a_fake_srun(tmp_path):
    # The whole SLURM path minus SLURM: nvidia.sbatch on the "batch host" -> srun (a stand-in that
    # starts both "nodes" here) -> torchrun.sh --slurm -> launch_env -> preflight with the shared
    # checkpoint-dir handshake -> torchrun c10d -> an all_reduce over both nodes.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "srun").write_text(FAKE_SRUN)
    (bindir / "srun").chmod(0o755)
    port = free_port()
    log = tmp_path / "srun.log"
    env = {
        **os.environ,
        "PATH": f"{bindir}:{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "SRUN_LOG": str(log),
        "OMP_NUM_THREADS": "1",
        "SLURM_JOB_NODELIST": "node[1-2]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NNODES": "2",
        "SLURM_NODEID": "0",
        "SLURM_JOB_ID": str(port),
        "SLURM_GPUS_ON_NODE": "1",
        "SLURM_CPUS_ON_NODE": "2",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NNODES", "NODE_RANK"):
        env.pop(k, None)
    ckpt = tmp_path / "ck"
    r = subprocess.run(
        [
            "bash",
            str(ROOT / "launch/slurm/nvidia.sbatch"),
            "--allow-cpu",
            "--checkpoint-dir",
            str(ckpt),
            "--module",
            "retnet_train.preflight",
            "--",
            "--dist-check",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    node0, node1 = (Path(f"{log}.node{i}").read_text() for i in (0, 1))
    assert r.returncode == 0, r.stderr + node0[-3000:] + "\n----\n" + node1[-3000:]
    assert log.read_text().split() == ["--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=2"]
    assert f"checkpoint dir {ckpt} is shared by all 2 nodes" in node0
    assert f"checkpoint dir {ckpt} is shared with node 0" in node1
    report = [line for line in (node0 + node1).splitlines() if line.startswith("dist-check ok:")]
    assert len(report) == 1 and "backend=gloo world_size=2 all_reduce=3" in report[0]


@pytest.mark.parametrize("sig, every_process", [(signal.SIGUSR1, True), (signal.SIGTERM, False)])
def test_stop_signal_checkpoints_and_exits_cleanly(tmp_path, sig, every_process):
    # SIGUSR1 to every process: what `sbatch --signal=USR1@600` does before the time limit. The agent
    # must survive it (torchrun.sh makes it ignore USR1) while the workers checkpoint and exit; then the
    # launch ends with the trainer's status 75 ("stopped after saving: run again"), which torchrun itself
    # would have turned into 1. SIGTERM to the script alone (an init or scheduler that signals only the
    # main process): torchrun.sh passes it to the workers.
    import time

    ensure_sample_data()
    run = tmp_path / "run"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK"):
        env.pop(k, None)
    proc = subprocess.Popen(
        [
            "bash",
            str(ROOT / "launch/torchrun.sh"),
            "--nproc-per-node",
            "2",
            "--no-preflight",
            "experiment=tiny_cpu",
            "train.micro_batch_size=2",
            "train.global_batch_tokens=1024",
            "train.max_steps=100000",
            "train.log_interval=1",
            f"run.dir={run}",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    pids: list[int] = []
    try:
        deadline = time.time() + 240
        while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("\n") >= 2):
            assert proc.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.2)
        pids = [proc.pid, *descendants(proc.pid)]
        assert len(pids) >= 3  # agent + 2 workers
        for pid in pids if every_process else [proc.pid]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        out, _ = proc.communicate(timeout=180)
    finally:
        for pid in pids[1:] if proc.poll() is None else []:
            try:
                os.kill(pid, 9)  # only the processes this test started
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, out[-4000:]
    assert f"{sig.name}: checkpoint saved to" in out
    assert (run / "checkpoints" / "latest").exists()
