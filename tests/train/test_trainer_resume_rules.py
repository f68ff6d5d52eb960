"""Which checkpoint a run resumes from, what it refuses to clobber, and the small stateful parts
(fault tracker, preemption signals) - without launching a trainer."""

import os
import signal

import pytest
import torch

from retnet_train.components.checkpoint import CheckpointManager
from retnet_train.components.faults import NonFiniteTracker, inject
from retnet_train.components.optim import GuardedAdamW
from retnet_train.components.preemption import PreemptionHandler
from retnet_train.components.resume import config_diff
from retnet_train.components.resume_source import resolve_resume


class FakeEngine:
    """Writes what DeepSpeed's save_checkpoint would (one file per tag) and records loads."""

    def __init__(self):
        self.loaded = None

    def save_checkpoint(self, directory, tag, client_state, save_latest):
        assert save_latest is False  # our own `latest` is written after every rank finished
        os.makedirs(os.path.join(directory, tag), exist_ok=True)
        torch.save(client_state, os.path.join(directory, tag, "mp_rank_00_model_states.pt"))

    def load_checkpoint(self, directory, tag):
        self.loaded = (directory, tag)
        return tag, torch.load(os.path.join(directory, tag, "mp_rank_00_model_states.pt"), weights_only=False)


def test_keep_last_latest_pointer_and_half_written_checkpoints(tmp_path):
    m = CheckpointManager(str(tmp_path), keep_last=2, rank=0)
    for step in (10, 20, 30):
        m.save(FakeEngine(), step, {"step": step})
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000020", "step_00000030"]
    assert (tmp_path / "latest").read_text() == "step_00000030"
    # a save killed midway: its directory exists, and even a `latest` naming it is not trusted
    (tmp_path / "step_00000040").mkdir()
    (tmp_path / "latest").write_text("step_00000040")
    assert m.latest_valid() == "step_00000030"
    with pytest.raises(ValueError, match="train.resume.*COMPLETE"):
        m.load(FakeEngine(), "step_00000040")
    # the next save clears the leftover
    m.save(FakeEngine(), 50, {"step": 50})
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000030", "step_00000050"]


def test_resume_auto_and_never(tmp_path):
    m = CheckpointManager(str(tmp_path / "ckpt"), keep_last=3, rank=0)
    assert resolve_resume("auto", m) is None
    assert resolve_resume("never", m) is None
    m.save(FakeEngine(), 5, {"step": 5})
    assert resolve_resume("auto", m) == (m.dir, "step_00000005")
    with pytest.raises(ValueError, match="train.resume=never.*already holds checkpoints"):
        resolve_resume("never", m)


def test_resume_from_another_run_loads_there_and_saves_here(tmp_path):
    other = CheckpointManager(str(tmp_path / "a" / "checkpoints"), keep_last=3, rank=0)
    for step in (5, 7):
        other.save(FakeEngine(), step, {"step": step})
    mine = CheckpointManager(str(tmp_path / "b" / "checkpoints"), keep_last=1, rank=0)
    # a checkpoint, the checkpoints dir, or the run dir
    for given in (tmp_path / "a" / "checkpoints" / "step_00000005", tmp_path / "a" / "checkpoints", tmp_path / "a"):
        expect = "step_00000005" if given.name.startswith("step_") else "step_00000007"
        assert resolve_resume(str(given), mine) == (other.dir, expect)
    engine = FakeEngine()
    assert mine.load(engine, "step_00000007", directory=other.dir)["train_state"]["step"] == 7
    assert engine.loaded == (other.dir, "step_00000007")
    mine.save(FakeEngine(), 8, {"step": 8})  # keep_last=1 here prunes nothing over there
    assert sorted(os.listdir(other.dir)) == ["latest", "step_00000005", "step_00000007"]
    assert sorted(os.listdir(mine.dir)) == ["latest", "step_00000008"]
    with pytest.raises(ValueError, match="already holds checkpoints"):
        resolve_resume(str(tmp_path / "a"), mine)  # would overwrite this run's own checkpoints
    with pytest.raises(ValueError, match="train.resume=.*no complete checkpoint"):
        resolve_resume(str(tmp_path / "nowhere"), CheckpointManager(str(tmp_path / "c"), 1, 0))


def test_nonfinite_tracker_counts_and_stops():
    t = NonFiniteTracker(max_consecutive=2)
    assert t.update(False, False) is False
    assert t.update(False, True) is True and t.consecutive == 1  # bad gradient norm, finite loss
    assert t.update(False, False) is False and t.consecutive == 0 and t.total == 1
    t.update(True, True)
    assert not t.should_stop
    t.update(True, True)
    assert t.should_stop and t.total == 3
    restored = NonFiniteTracker(2)
    restored.load_state_dict(t.state_dict())
    assert restored.should_stop and restored.total == 3
    fp16 = NonFiniteTracker(1, scaler_skips_are_normal=True)
    fp16.update(False, True)  # a loss-scale overflow: skipped, but no reason to stop
    assert fp16.total == 1 and not fp16.should_stop
    fp16.update(True, True)
    assert fp16.should_stop


def test_injected_faults():
    w = torch.nn.Parameter(torch.ones(2))
    loss = inject((w * 2).sum(), 3, loss_at=[], grad_at=[3])
    assert torch.isfinite(loss)
    loss.backward()
    assert not torch.isfinite(w.grad).any()
    assert torch.isnan(inject(torch.tensor(1.0), 4, loss_at=[4], grad_at=[])).item()
    assert inject(torch.tensor(1.0), 5, loss_at=[4], grad_at=[4]).item() == 1.0


def test_guarded_adamw_reports_overflow_to_deepspeed():
    w = torch.nn.Parameter(torch.ones(3))
    opt = GuardedAdamW([w], max_norm=1.0, lr=0.1)
    w.grad = torch.tensor([float("inf"), 0.0, 0.0])
    opt.step()
    assert opt.overflow and torch.equal(w.detach(), torch.ones(3))
    w.grad = torch.tensor([0.3, 0.4, 0.0])
    opt.step()
    assert not opt.overflow and opt._global_grad_norm == pytest.approx(0.5)


def test_cli_prints_a_training_error_and_exits_1(monkeypatch, capsys):
    """How the command line ends a run that stops on non-finite steps. test_trainer_multirank.py
    runs those in-process (trainer_helpers.run_scenarios) and checks the TrainingError itself."""
    import retnet_train.train as cli
    from retnet_train.components.faults import TrainingError
    from retnet_train.preflight import compose_trainer_config

    def stop(cfg):
        raise TrainingError("3 consecutive steps with non-finite loss or gradients")

    monkeypatch.setattr(cli, "run", stop)
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: None)  # in-process tests share it
    with pytest.raises(SystemExit) as e:
        cli.main.__wrapped__(compose_trainer_config([]))  # the function under @hydra.main
    assert e.value.code == 1
    assert "error: 3 consecutive steps with non-finite loss or gradients" in capsys.readouterr().err


@pytest.mark.parametrize(
    "outcome,status", [({"preempted": True}, 75), ({"preempted": False}, 0), (KeyboardInterrupt(), 130)]
)
def test_cli_exit_status_tells_a_stop_on_a_signal_from_the_end(monkeypatch, tmp_path, outcome, status):
    """75 (stopped by SIGTERM / SIGUSR1 after saving: run again), 0 (finished) or 130 (Ctrl-C), also
    written where a launcher asks for it (torchrun itself ends with 1 for any failed worker)."""
    import retnet_train.train as cli
    from retnet_train.preflight import compose_trainer_config

    def run(cfg):
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    monkeypatch.setattr(cli, "run", run)
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: None)  # in-process tests share it
    monkeypatch.setenv("RETNET_EXIT_STATUS_FILE", str(tmp_path / "status"))
    with pytest.raises(SystemExit) as e:
        cli.main.__wrapped__(compose_trainer_config([]))
    assert e.value.code == status
    assert (tmp_path / "status").read_text() == f"{status}\n" and os.listdir(tmp_path) == ["status"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signals_are_caught_and_handlers_restored(sig):
    before = signal.getsignal(sig)
    handler = PreemptionHandler()
    try:
        os.kill(os.getpid(), sig)
        assert handler.received == signal.Signals(sig).name
    finally:
        handler.restore()
    assert signal.getsignal(sig) == before


def test_config_diff_names_changed_leaves():
    old = {"train": {"max_steps": 2, "seed": 1}, "optim": {"lr": 0.1}, "model": {"arch": "retnet"}}
    new = {"train": {"max_steps": 4, "seed": 1}, "optim": {"lr": 0.1}, "model": {"arch": "retnet", "d_model": 8}}
    assert config_diff(old, new) == ["model.d_model: <absent> -> 8", "train.max_steps: 2 -> 4"]
    assert config_diff(new, new) == []


def test_a_handler_takes_over_the_signal_the_one_it_replaces_recorded():
    """The entry point's handler records a signal that comes before the trainer's is installed."""
    early = PreemptionHandler()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        trainers = PreemptionHandler()
        assert trainers.received == "SIGUSR1"
        trainers.restore()
        assert signal.getsignal(signal.SIGTERM) == early._handle
    finally:
        early.restore()


def test_ctrl_c_says_where_the_same_command_goes_on_from(tmp_path):
    from retnet_train.components.config import TrainConfig
    from retnet_train.train import interrupted_line

    cfg = TrainConfig()
    cfg.run.dir = str(tmp_path / "run")
    assert interrupted_line(cfg).endswith("the run starts fresh (no checkpoint saved yet)")
    cfg.train.resume = str(tmp_path / "other")
    assert interrupted_line(cfg).endswith(f"the run starts again from train.resume={tmp_path / 'other'}")
    CheckpointManager(str(tmp_path / "run" / "checkpoints"), keep_last=2, rank=0).save(FakeEngine(), 4, {"step": 4})
    assert interrupted_line(cfg) == (
        "interrupted, nothing saved: started again with the same command, the run goes on from "
        f"{tmp_path / 'run' / 'checkpoints' / 'step_00000004'}"
    )
    assert interrupted_line(None) == "interrupted before the config was read: nothing saved"
