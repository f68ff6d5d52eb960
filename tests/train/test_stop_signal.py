"""SIGUSR1 / SIGTERM in the trainer's own process: a checkpoint at the step boundary, then "preempted"
(exit 75: run again, the SLURM scripts requeue) only while steps are left to train."""

from __future__ import annotations

import os
import signal

import pytest
from trainer_helpers import shards, typed  # noqa: F401  (shards: a fixture)

from retnet_train.trainer import Trainer


def run_with_signal_during(step: int, data, run_dir, sig=signal.SIGUSR1, **extra) -> dict:
    trainer = Trainer(typed(data, run_dir, **{"train.max_steps": 3, "checkpoint.interval": 1000, **extra}))
    train_step = trainer.train_step

    def signalled_step():
        if trainer.state.step + 1 == step:  # arrives while this step runs
            os.kill(os.getpid(), sig)
        return train_step()

    trainer.train_step = signalled_step
    return trainer.train()


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_before_the_last_step_saves_and_stops(shards, tmp_path, process_group, capsys, sig):  # noqa: F811
    summary = run_with_signal_during(2, shards, tmp_path / "run", sig)
    assert (summary["step"], summary["preempted"]) == (2, True)
    assert summary["checkpoint"] == str(tmp_path / "run" / "checkpoints" / "step_00000002")
    out = capsys.readouterr().out
    assert f"{signal.Signals(sig).name}: checkpoint saved to {summary['checkpoint']} at step 2; exiting" in out
    assert "done at step" not in out


def test_a_signal_during_the_last_step_is_a_finished_run(shards, tmp_path, process_group, capsys):  # noqa: F811
    summary = run_with_signal_during(3, shards, tmp_path / "run")
    # nothing is left to resume: exit 0, not 75 (a requeued job would train no step)
    assert (summary["step"], summary["preempted"]) == (3, False)
    assert summary["checkpoint"] == str(tmp_path / "run" / "checkpoints" / "step_00000003")
    out = capsys.readouterr().out
    assert "done at step 3" in out and "exiting (resume" not in out


def test_a_signal_before_a_finished_run_starts_is_not_a_preemption(shards, tmp_path, process_group, capsys):  # noqa: F811
    """A signal while a run that has nothing left to train loads its checkpoint (of step max_steps): the
    run finishes (exit 0), not "preempted" (75, on which the SLURM scripts requeue it, to stop again)."""
    run_dir = tmp_path / "run"
    Trainer(typed(shards, run_dir, **{"train.max_steps": 2})).train()
    capsys.readouterr()
    trainer = Trainer(typed(shards, run_dir, **{"train.max_steps": 2}))
    restore = trainer.restore

    def signalled_restore():
        os.kill(os.getpid(), signal.SIGUSR1)  # arrives while the checkpoint loads
        restore()

    trainer.restore = signalled_restore
    summary = trainer.train()
    assert (summary["step"], summary["preempted"]) == (2, False)
    assert summary["checkpoint"] == str(run_dir / "checkpoints" / "step_00000002")
    out = capsys.readouterr().out
    assert "done at step 2" in out


def test_a_resume_never_run_stopped_by_a_signal_goes_on_with_the_same_command(shards, tmp_path, process_group, capsys):  # noqa: F811
    """Exit 75 says the same command resumes (the SLURM scripts requeue it): a train.resume=never run goes on
    from the checkpoint it saved; another config with resume=never is still refused."""
    run_dir = tmp_path / "run"
    never = {"train.resume": "never"}
    assert run_with_signal_during(2, shards, run_dir, **never)["preempted"]
    capsys.readouterr()
    summary = Trainer(typed(shards, run_dir, **{"train.max_steps": 3, "checkpoint.interval": 1000, **never})).train()
    assert (summary["step"], summary["preempted"]) == (3, False)
    out = capsys.readouterr().out
    assert f"train.resume=never: {run_dir / 'checkpoints' / 'step_00000002'} was saved by this same run" in out
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000002'} at step 2" in out
    other = typed(shards, run_dir, **{"train.max_steps": 4, "checkpoint.interval": 1000, **never})
    with pytest.raises(ValueError, match="train.resume=never but .* already holds checkpoints"):
        Trainer(other).train()
