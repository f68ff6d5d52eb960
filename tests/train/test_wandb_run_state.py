"""What W&B shows of a run's end: a run that stops with an error (here too many non-finite steps, exit 1)
finishes its W&B run with exit code 1, which W&B shows as failed, not as finished; a run that trains to
train.max_steps finishes it with 0."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
from trainer_helpers import shards, typed  # noqa: F401

from retnet_train.components.faults import TrainingError
from retnet_train.trainer import Trainer


class RecordingRun:
    def __init__(self):
        self.exit_codes = []

    def define_metric(self, name, step_metric=None):
        pass

    def log(self, data):
        pass

    def finish(self, exit_code=None):
        self.exit_codes.append(exit_code)


@pytest.fixture
def wandb_run(monkeypatch):
    run = RecordingRun()
    fake = SimpleNamespace(init=lambda **kw: run, errors=SimpleNamespace(Error=RuntimeError))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return run


def test_a_run_stopped_by_an_error_is_a_failed_wandb_run(shards, tmp_path, process_group, wandb_run):  # noqa: F811
    extra = {"wandb.mode": "offline", "train.max_steps": 4, "train.inject_nonfinite_at": "[2,3]"}
    trainer = Trainer(typed(shards, tmp_path / "run", **extra, **{"train.max_consecutive_nonfinite": 2}))
    with pytest.raises(TrainingError):
        trainer.train()
    assert wandb_run.exit_codes == [1]


def test_a_finished_run_is_a_finished_wandb_run(shards, tmp_path, process_group, wandb_run):  # noqa: F811
    Trainer(typed(shards, tmp_path / "run", **{"wandb.mode": "offline", "train.max_steps": 1})).train()
    assert wandb_run.exit_codes == [0]
