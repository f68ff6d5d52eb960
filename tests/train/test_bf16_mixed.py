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


def optimizer_tensors(engine) -> list:
    """Every tensor of the fp32 optimizer's state (Adam's moments and step), in the optimizer's order:
    the torch optimizer itself at ZeRO 0, the one DeepSpeed's ZeRO optimizer wraps at 1."""
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return [t.detach().clone() for s in base.state.values() for _, t in sorted(s.items()) if torch.is_tensor(t)]


@pytest.mark.parametrize("zero_stage", [1, 0])
def test_runs_under_autocast_and_resumes_from_fp32(shards, tmp_path, zero_stage, capsys):  # noqa: F811
    from retnet_train.trainer import Trainer

    init_dist()
    run = tmp_path / "run"
    common = {"deepspeed.zero_stage": zero_stage, "checkpoint.interval": 2, "train.max_steps": 2}
    first = Trainer(typed(shards, run, **common, **{"deepspeed.precision": "fp32"}))
    first.train()
    saved_weights = {k: v.detach().clone() for k, v in first.engine.module.state_dict().items()}
    saved_optimizer = optimizer_tensors(first.engine)
    capsys.readouterr()
    second = Trainer(typed(shards, run, **{**common, "train.max_steps": 4, "deepspeed.precision": "bf16-mixed"}))
    restored = {}
    restore = second.restore

    def restore_and_record():  # what the bf16-mixed engine holds right after loading, before step 3
        restore()
        restored["weights"] = {k: v.detach().clone() for k, v in second.engine.module.state_dict().items()}
        restored["optimizer"] = optimizer_tensors(second.engine)

    second.restore = restore_and_record
    summary = second.train()
    assert "resumed from" in capsys.readouterr().out and summary["step"] == 4
    engine = second.engine
    assert engine.torch_autocast_enabled() and {p.dtype for p in engine.module.parameters()} == {torch.float32}
    # the fp32 run's weights and Adam state, bit for bit: not the run's own draws, nor fresh moments
    assert restored["weights"].keys() == saved_weights.keys()
    assert all(torch.equal(restored["weights"][k], v) for k, v in saved_weights.items())
    assert len(saved_optimizer) == len(restored["optimizer"]) > 0
    assert all(torch.equal(a, b) for a, b in zip(saved_optimizer, restored["optimizer"]))
    got = losses(run)
    assert sorted(got) == [1, 2, 3, 4] and all(v == v for v in got.values())
    # the resumed weights are the fp32 run's: training goes on from its loss, not from a fresh start
    assert got[3] < got[1]
