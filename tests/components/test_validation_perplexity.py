"""A validation loss past what exp() can hold: val_ppl is inf (not a clamp's exp(50)), and the metrics sink
writes a non-finite value as null in metrics.jsonl, as it does a skipped step's non-finite loss, while the
console line prints it as inf."""

import json
import math
import sys
from types import SimpleNamespace

import pytest

from retnet_train.components.metrics import MetricsLogger
from retnet_train.components.validation import MeanLoss, validation_metrics


@pytest.mark.parametrize(
    "loss, ppl",
    [(2.0, math.exp(2.0)), (60.0, math.exp(60.0)), (800.0, math.inf), (math.inf, math.inf)],
)
def test_val_ppl_is_exp_of_the_loss_and_inf_past_the_largest_float(loss, ppl):
    assert validation_metrics(5, MeanLoss(loss, 8, 1))["val_ppl"] == ppl


def test_a_nan_loss_has_a_nan_perplexity():
    assert math.isnan(validation_metrics(5, MeanLoss(math.nan, 8, 1))["val_ppl"])


def test_an_inf_validation_loss_is_null_in_metrics_jsonl_and_inf_on_the_console(tmp_path, monkeypatch, capsys):
    kept = []
    run = SimpleNamespace(define_metric=lambda *a, **k: None, log=kept.append, finish=lambda exit_code=None: None)
    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(init=lambda **kw: run, errors=None))
    cfg = SimpleNamespace(mode="offline", project="p", entity=None, name=None, tags=[])
    logger = MetricsLogger(str(tmp_path), True, cfg, {}, None)
    logger.log(validation_metrics(5, MeanLoss(math.inf, 8, 1)))
    assert capsys.readouterr().out == "step 5 | val_loss inf | val_ppl inf\n"
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"not JSON: {c}")) == {
        "step": 5,
        "val_loss": None,
        "val_ppl": None,
    }
    assert kept == [{"step": 5}]  # W&B leaves a null out, as it does a skipped step's loss
