"""metrics.jsonl as a resumed run appends to it: every record on a line of its own."""

import json
from types import SimpleNamespace

from retnet_train.components.metrics import MetricsLogger

NO_WANDB = SimpleNamespace(mode="disabled")


def test_a_resumed_run_starts_its_records_on_a_new_line_after_one_cut_short(tmp_path):
    """A run killed while writing a record leaves it without its newline; the resumed run's first record
    was appended to that line, and both were lost to every reader of the file."""
    metrics = tmp_path / "metrics.jsonl"
    first = json.dumps({"step": 20, "loss": 6.0}) + "\n"
    metrics.write_text(first + '{"step": 40, "val_loss": 5.09')  # killed here
    logger = MetricsLogger(str(tmp_path), True, NO_WANDB, {}, None)
    logger.log({"step": 25, "loss": 5.8})
    logger.log({"step": 30, "loss": 5.5})
    lines = metrics.read_text().splitlines()
    assert lines[:2] == [first.strip(), '{"step": 40, "val_loss": 5.09']  # kept as it was
    assert [json.loads(line) for line in lines[2:]] == [{"step": 25, "loss": 5.8}, {"step": 30, "loss": 5.5}]


def test_records_of_a_new_or_whole_file_follow_each_other(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    MetricsLogger(str(tmp_path), True, NO_WANDB, {}, None).log({"step": 1, "loss": 9.0})
    MetricsLogger(str(tmp_path), True, NO_WANDB, {}, None).log({"step": 2, "loss": 8.0})
    assert metrics.read_text() == '{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 8.0}\n'
