"""The multi-node path for real: two "nodes" (two launch/torchrun.sh processes, one worker each)
meet through c10d rendezvous on 127.0.0.1 and talk over gloo on CPU. Each node also runs the
preflight, whose shared-checkpoint-dir handshake goes through the common tmp dir."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_nodes(tmp_path: Path, node_args: list[str], prog_args: list[str], timeout: float = 300,
                     env_extra: dict | None = None) -> list[tuple[int, str]]:
    port = free_port()
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK"):
        env.pop(k, None)
    procs = []
    for rank in (1, 0):  # node 1 first: it must wait for node 0's store and marker
        cmd = ["bash", str(ROOT / "launch/torchrun.sh"), "--nnodes", "2", "--node-rank", str(rank),
               "--master-addr", "127.0.0.1", "--master-port", str(port), "--rdzv-id", f"test-{port}",
               "--nproc-per-node", "1", *node_args, "--", *prog_args]
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            results.append((p.returncode, out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results[::-1]  # node 0, node 1


def test_two_nodes_rendezvous_and_all_reduce(tmp_path):
    ckpt = tmp_path / "ckpt"
    (rc0, out0), (rc1, out1) = launch_two_nodes(
        tmp_path, ["--checkpoint-dir", str(ckpt), "--params", "1e6", "--module", "retnet_train.preflight"],
        ["--dist-check"])
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
    procs = [subprocess.Popen(["bash", str(ROOT / "launch/torchrun.sh"), "--nnodes", "2", "--node-rank", str(r),
                               "--master-addr", "127.0.0.1", "--master-port", str(port), "--nproc-per-node", "1",
                               "--checkpoint-dir", str(tmp_path / "ck" if r == 0 else blocker / "ck"),
                               "--module", "retnet_train.preflight", "--", "--dist-check"],
                              cwd=tmp_path, env={**env, "PREFLIGHT_SHARED_TIMEOUT": "5"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], outs
    assert "preflight failed on node 1" in outs[1] and "not writable: Not a directory" in outs[1]
    assert "preflight failed on node 0" in outs[0] and "did not acknowledge" in outs[0]
    assert not any("dist-check ok" in o for o in outs)
