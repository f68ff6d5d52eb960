"""SIGUSR1 / SIGTERM before the first step (while the run is built or its checkpoint loaded), sent for
real to the trainer's command line in a subprocess: the run stops with 75 (the SLURM scripts requeue)
without saving or writing anything, and a checkpoint being loaded is loaded to the end first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from trainer_helpers import REPO, env, overrides, shards, typed  # noqa: F401  (shards: a fixture)

from retnet_train.trainer import Trainer

SIGNALLED = str(Path(__file__).resolve().parent / "signalled_train.py")


def signalled_run(where: str, sig: str, args: list, nproc: int = 1, **extra_env) -> subprocess.CompletedProcess:
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd = [*launcher, *([f"--nproc_per_node={nproc}"] if nproc > 1 else []), SIGNALLED, where, sig, *args]
    run_env = {**env(), "PYTHONPATH": str(REPO), **extra_env}
    return subprocess.run(cmd, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=240)


def test_a_signal_while_the_model_is_built_stops_with_75_and_writes_nothing(shards, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    proc = signalled_run("build_model", "SIGUSR1", overrides(shards, run_dir))
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert "SIGUSR1 before training started: nothing saved; exiting (the same command starts again fresh)" in (
        proc.stdout
    )
    assert not list((run_dir / "checkpoints").glob("step_*"))
    assert not (run_dir / "metrics.jsonl").exists()


def test_a_signal_while_a_checkpoint_loads_finishes_loading_then_stops_with_75(
    shards,
    tmp_path,
    process_group,
    capsys,  # noqa: F811
):
    run_dir = tmp_path / "run"
    Trainer(typed(shards, run_dir, **{"train.max_steps": 2})).train()  # saves step 2 at the end
    ckpts = run_dir / "checkpoints"
    before = {p.name: p.read_bytes() for p in (run_dir / "metrics.jsonl", ckpts / "latest")}

    proc = signalled_run("load_checkpoint", "SIGTERM", overrides(shards, run_dir, **{"train.max_steps": 4}))
    assert proc.returncode == 75, proc.stderr[-3000:]
    step2 = ckpts / "step_00000002"
    assert f"resumed from {step2} at step 2" in proc.stdout  # the load went to its end
    assert f"SIGTERM before training started: nothing saved; exiting (the same command starts again from {step2})" in (
        proc.stdout
    )
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000002"]
    assert {p.name: p.read_bytes() for p in (run_dir / "metrics.jsonl", ckpts / "latest")} == before


@pytest.mark.slow
def test_a_signal_on_one_rank_during_the_build_stops_every_rank(shards, tmp_path):  # noqa: F811
    run_dir, status = tmp_path / "run", tmp_path / "status"
    proc = signalled_run(
        "build_model",
        "SIGUSR1",
        overrides(shards, run_dir),
        nproc=2,
        SIGNAL_RANK="1",
        RETNET_EXIT_STATUS_FILE=str(status),
    )
    # torchrun's own status is 1 for any worker that did not end with 0; the workers' is in the file
    assert status.read_text() == "75\n", proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "signal on another rank before training started: nothing saved" in proc.stdout
    assert not list((run_dir / "checkpoints").glob("step_*"))


def test_a_signal_while_a_finished_run_is_built_ends_it_as_finished(shards, tmp_path, process_group):  # noqa: F811
    """A finished run started again (its checkpoint at train.max_steps) has nothing to train, so a stop
    signal during its build ends it as finished (0), not as preempted (75): the SLURM scripts would
    requeue a 75 for nothing."""
    run_dir = tmp_path / "run"
    Trainer(typed(shards, run_dir, **{"train.max_steps": 2})).train()
    ckpts = run_dir / "checkpoints"
    before = {p.name: p.read_bytes() for p in (run_dir / "metrics.jsonl", ckpts / "latest")}

    proc = signalled_run("build_model", "SIGTERM", overrides(shards, run_dir, **{"train.max_steps": 2}))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "already at step 2 >= train.max_steps=2: nothing to train" in proc.stdout
    assert "before training started" not in proc.stdout
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000002"]
    assert {p.name: p.read_bytes() for p in (run_dir / "metrics.jsonl", ckpts / "latest")} == before
