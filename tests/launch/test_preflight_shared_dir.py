"""retnet_train.preflight's multi-node handshake: every node must see node 0's marker in the
checkpoint dir, or the dir is node-local and every node fails, naming it."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from launch_helpers import ROOT, run_together
from preflight_helpers import preflight_command, preflight_env

from retnet_train import preflight as pf

HINT = (
    "is it node-local storage (/tmp, local NVMe, a per-node mount)? Checkpoints must be on a filesystem all nodes mount"
)


def run_nodes(dirs: list[Path], timeout: float = 10.0, shared_id: str = "job1", start_order=None) -> list[pf.Report]:
    reports = [pf.Report() for _ in dirs]
    order = start_order or range(len(dirs))

    def node(r):
        pf.check_shared(reports[r], dirs[r], shared_id=shared_id, node_rank=r, nnodes=len(dirs), timeout=timeout)

    threads = [threading.Thread(target=node, args=(r,)) for r in order]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 30)
    return reports


def write_marker(ckpt: Path, nonce: str) -> Path:
    """Node 0's marker for job1, as a node that started earlier (or a crashed attempt) left it."""
    d = ckpt / ".preflight"
    d.mkdir()
    (d / "job1.marker").write_text(json.dumps({"nonce": nonce, "host": "x"}))
    return d


@pytest.fixture
def node_local_dirs(tmp_path) -> tuple[Path, Path]:
    a, b = tmp_path / "node0-local", tmp_path / "node1-local"
    a.mkdir(), b.mkdir()
    return a, b


def test_shared_dir_passes_on_all_nodes_and_leaves_nothing(tmp_path):
    reports = run_nodes([tmp_path] * 3, start_order=[2, 1, 0])  # the others may start before node 0
    assert [r.failures for r in reports] == [[], [], []]
    assert reports[0].lines[-1][1] == f"checkpoint dir {tmp_path} is shared by all 3 nodes"
    assert reports[2].lines[-1][1] == f"checkpoint dir {tmp_path} is shared with node 0"
    assert list(tmp_path.iterdir()) == []


def test_stale_files_of_an_earlier_attempt_do_not_confuse_it(tmp_path):
    # A requeued job keeps its id: marker, done and ack of a crashed attempt are on disk.
    d = write_marker(tmp_path, "old")
    (d / "job1.done").write_text("old")
    (d / "job1.ack-1").write_text("old")
    reports = run_nodes([tmp_path] * 2, start_order=[0, 1])
    assert [r.failures for r in reports] == [[], []]


def test_node_local_dir_fails_on_every_node(node_local_dirs):
    a, b = node_local_dirs
    reports = run_nodes([a, b], timeout=1.0)
    assert len(reports[0].failures) == 1 and len(reports[1].failures) == 1
    assert f"checkpoint dir {a} is not shared: node(s) [1] did not acknowledge" in reports[0].failures[0]
    assert f"checkpoint dir {b} is not shared (node 1): node 0's marker" in reports[1].failures[0]
    assert "node-local storage" in reports[1].failures[0]


def test_node_local_dir_messages_and_what_is_left(node_local_dirs):
    a, b = node_local_dirs
    reports = run_nodes([a, b], timeout=0.5)
    assert reports[0].failures == [
        f"checkpoint dir {a} is not shared: node(s) [1] did not acknowledge node 0's marker "
        f"{a / '.preflight' / 'job1.marker'} within 0.5s; {HINT} (or did those nodes not start the preflight?)"
    ]
    assert reports[1].failures == [
        f"checkpoint dir {b} is not shared (node 1): node 0's marker {b / '.preflight' / 'job1.marker'} "
        f"never appeared within 0.5s; {HINT}"
    ]
    assert list((a / ".preflight").iterdir()) == []  # node 0 took its marker back


def test_a_node_that_sees_the_marker_but_never_the_completion_fails(tmp_path):
    d = write_marker(tmp_path, "abc")
    rep = pf.Report()
    pf.check_shared(rep, tmp_path, shared_id="job1", node_rank=2, nnodes=3, timeout=0.5)
    assert rep.failures == [
        f"checkpoint dir {tmp_path} is not shared (node 2): saw node 0's marker but not its completion "
        f"within 0.5s; {HINT}"
    ]
    assert (d / "job1.ack-2").read_text() == "abc"  # acknowledged, then waited in vain


def test_one_node_needs_no_handshake(tmp_path):
    rep = pf.Report()
    pf.check_shared(rep, tmp_path, shared_id="job1", node_rank=0, nnodes=1, timeout=0.5)
    assert rep.lines == [("ok", "checkpoint dir sharing: single node, not needed")]
    assert list(tmp_path.iterdir()) == []


def test_two_node_cli_through_the_shared_dir(tmp_path):
    commands = [
        preflight_command(
            "--checkpoint-dir",
            str(tmp_path),
            "--nnodes",
            "2",
            "--node-rank",
            str(r),
            "--shared-id",
            "cli",
            "--shared-timeout",
            "60",
            "--params",
            "1e6",
            "--no-config",
        )
        for r in (1, 0)
    ]
    rcs, outs = run_together(commands, cwd=ROOT, env=preflight_env(), timeout=120)
    assert rcs == [0, 0], outs
    assert "is shared with node 0" in outs[0] and "is shared by all 2 nodes" in outs[1]
