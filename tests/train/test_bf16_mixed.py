"""deepspeed.precision=bf16-mixed in the trainer: fp32 weights under torch.autocast, and checkpoints that
resume across fp32 and bf16-mixed (the same fp32 weights and optimizer state) at ZeRO 0 and 1."""

import sys
from pathlib import Path

import pytest
import torch
from trainer_helpers import losses, shards, typed  # noqa: F401 (shards: a fixture)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "inference"))
from gen_fixtures import init_dist  # noqa: E402

pytest.importorskip("deepspeed")


@pytest.mark.parametrize("zero_stage", [1, 0])
def test_runs_under_autocast_and_resumes_from_fp32(shards, tmp_path, zero_stage, capsys):  # noqa: F811
    from retnet_train.trainer import Trainer

    init_dist()
    run = tmp_path / "run"
    common = {"deepspeed.zero_stage": zero_stage, "checkpoint.interval": 2, "train.max_steps": 2}
    first = Trainer(typed(shards, run, **common, **{"deepspeed.precision": "fp32"}))
    first.train()
    capsys.readouterr()
    second = Trainer(typed(shards, run, **{**common, "train.max_steps": 4, "deepspeed.precision": "bf16-mixed"}))
    summary = second.train()
    assert "resumed from" in capsys.readouterr().out and summary["step"] == 4
    engine = second.engine
    assert engine.torch_autocast_enabled() and {p.dtype for p in engine.module.parameters()} == {torch.float32}
    got = losses(run)
    assert sorted(got) == [1, 2, 3, 4] and all(v == v for v in got.values())
    # the resumed weights are the fp32 run's: training goes on from its loss, not from a fresh start
    assert got[3] < got[1]
