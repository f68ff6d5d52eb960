"""W&B gets every record, charted against the trainer's step: a run resumed after a crash logs again the
steps after its checkpoint, which W&B drops when they are logged as its own step (below its counter)."""

import sys
from types import SimpleNamespace

from retnet_train.components.metrics import MetricsLogger


class FakeRun:
    """What W&B does with log(step=...): a record below its step counter is dropped."""

    def __init__(self):
        self.counter, self.kept, self.metrics = 0, [], []

    def define_metric(self, name, step_metric=None):
        self.metrics.append((name, step_metric))

    def log(self, data, step=None):
        if step is not None and step < self.counter:
            return  # "Tried to log to step ... that is less than the current step"
        self.counter = self.counter + 1 if step is None else step
        self.kept.append(data)

    def finish(self, exit_code=None):
        pass


def test_records_of_steps_trained_again_after_a_resume_reach_wandb(tmp_path, monkeypatch):
    run = FakeRun()
    fake = SimpleNamespace(init=lambda **kw: run, errors=SimpleNamespace(Error=RuntimeError))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = SimpleNamespace(mode="offline", project="p", entity=None, name=None, tags=[])
    first = MetricsLogger(str(tmp_path), True, cfg, {}, None)
    for step in (10, 20, 30):  # the first attempt, which crashes after step 30 (checkpoint at 10)
        first.log({"step": step, "loss": 1.0 / step})
    again = MetricsLogger(str(tmp_path), True, cfg, {}, first.wandb_id)
    for step in (20, 30, 40):  # resumed from step 10
        again.log({"step": step, "loss": 2.0 / step})
    assert [r["step"] for r in run.kept] == [10, 20, 30, 20, 30, 40]
    assert run.kept[3]["loss"] == 0.1  # the resumed run's record of step 20
    assert run.metrics[:2] == [("step", None), ("*", "step")]


def test_a_value_not_known_is_null_in_the_file_and_left_out_of_the_console_and_wandb(tmp_path, monkeypatch, capsys):
    """A record's None (no gradient norm on a skipped step, no MFU without a known peak): metrics.jsonl
    keeps the key as null; the console line and W&B leave it out rather than chart or print a None."""
    import json

    run = FakeRun()
    fake = SimpleNamespace(init=lambda **kw: run, errors=SimpleNamespace(Error=RuntimeError))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = SimpleNamespace(mode="offline", project="p", entity=None, name=None, tags=[])
    logger = MetricsLogger(str(tmp_path), True, cfg, {}, None)
    logger.log({"step": 3, "loss": 0.5, "grad_norm": None, "mfu": None})
    assert run.kept == [{"step": 3, "loss": 0.5}]
    assert capsys.readouterr().out == "step 3 | loss 0.5\n"
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 3, "loss": 0.5, "grad_norm": None, "mfu": None}]


class DyingRun(FakeRun):
    """W&B's service gone after the first record (its process killed, a full disk under wandb/): every
    later call raises, as wandb 0.31 raises ConnectionResetError('Connection lost')."""

    def log(self, data, step=None):
        if self.kept:
            raise ConnectionResetError("Connection lost")
        super().log(data, step)

    def finish(self, exit_code=None):
        raise ConnectionResetError("Connection lost")


def test_a_wandb_failure_mid_run_is_one_warning_and_metrics_go_on(tmp_path, monkeypatch, capsys):
    """W&B failing at step 20 neither stops the run (its steps since the last checkpoint would be lost)
    nor goes unsaid: one warning on stderr names the step and the error, W&B is left alone from there,
    and metrics.jsonl gets every record; closing the logger does not raise either."""
    import json

    run, teardowns = DyingRun(), []
    fake = SimpleNamespace(
        init=lambda **kw: run, errors=SimpleNamespace(Error=RuntimeError), teardown=lambda: teardowns.append(1)
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = SimpleNamespace(mode="online", project="p", entity=None, name=None, tags=[])
    logger = MetricsLogger(str(tmp_path), True, cfg, {}, None)
    for step in (10, 20, 30):
        logger.log({"step": step, "loss": 1.0})
    logger.close()
    assert run.kept == [{"step": 10, "loss": 1.0}]
    assert teardowns == [1]  # the service let go at once: its exit hook prints no second traceback
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "warning: W&B logging failed at step 20 (ConnectionResetError: Connection lost): W&B is off for the "
        f"rest of this run; metrics.jsonl keeps every record ({tmp_path / 'metrics.jsonl'})"
    ]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [10, 20, 30]


def test_a_failing_wandb_finish_is_a_warning(tmp_path, monkeypatch, capsys):
    """finish() failing at the end (the upload cut off) must not turn a finished run into a traceback."""
    run = FakeRun()
    run.finish = DyingRun.finish.__get__(run)
    fake = SimpleNamespace(init=lambda **kw: run, errors=SimpleNamespace(Error=RuntimeError))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = SimpleNamespace(mode="offline", project="p", entity=None, name=None, tags=[])
    logger = MetricsLogger(str(tmp_path), True, cfg, {}, None)
    logger.log({"step": 1, "loss": 1.0})
    logger.close()
    assert capsys.readouterr().err.splitlines() == [
        "warning: W&B could not finish its run (ConnectionResetError: Connection lost); metrics.jsonl keeps "
        f"every record ({tmp_path / 'metrics.jsonl'})"
    ]


def unreachable_wandb(monkeypatch, error: Exception) -> list:
    """A wandb module whose init raises `error` (W&B unreachable at start); teardown calls are counted."""
    teardowns = []

    def init(**kwargs):
        raise error

    fake = SimpleNamespace(init=init, errors=SimpleNamespace(Error=RuntimeError), teardown=lambda: teardowns.append(1))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return teardowns


def test_wandb_that_cannot_start_is_one_warning_and_metrics_go_on(tmp_path, monkeypatch, capsys):
    """W&B unreachable at start (a requeued job's start, the network down) does what a failure mid-run does:
    one warning, W&B left alone, every record in metrics.jsonl; the run is not stopped, so a requeued job
    trains (and stops with 75 on the next signal) instead of ending with 1, which SLURM does not requeue."""
    import json

    for error in (RuntimeError("Network error (ConnectError), entering retry loop"), ConnectionRefusedError(111)):
        teardowns = unreachable_wandb(monkeypatch, error)
        cfg = SimpleNamespace(mode="online", project="p", entity=None, name=None, tags=[], required=False)
        logger = MetricsLogger(str(tmp_path), True, cfg, {}, "abc123")
        logger.log({"step": 1, "loss": 1.0})
        logger.close()
        assert logger.wandb_id == "abc123" and teardowns == [1]  # the id a later start continues
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(
            f"warning: W&B could not start (wandb.mode=online: {type(error).__name__}: "
        ), err
        assert "this run trains without W&B (wandb.required=true stops it instead)" in err[0]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 1]


def test_wandb_that_cannot_start_stops_the_run_when_required(tmp_path, monkeypatch):
    import pytest

    unreachable_wandb(monkeypatch, RuntimeError("No API key configured. Use `wandb login` to log in."))
    cfg = SimpleNamespace(mode="online", project="p", entity=None, name=None, tags=[], required=True)
    with pytest.raises(ValueError, match="^wandb.mode=online: No API key configured.*wandb.required=false"):
        MetricsLogger(str(tmp_path), True, cfg, {}, None)
