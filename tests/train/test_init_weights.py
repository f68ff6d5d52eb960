"""train.init_weights in the trainer: a fresh run starts from another run's DeepSpeed checkpoint (export
dirs and refusals: tests/components/test_initial_weights.py)."""

import sys
from pathlib import Path

import pytest
import torch
from trainer_helpers import shards, typed  # noqa: F401 (shards: a fixture)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "inference"))
from gen_fixtures import init_dist  # noqa: E402

pytest.importorskip("deepspeed")


def test_a_fresh_run_starts_from_another_runs_checkpoint(shards, tmp_path):  # noqa: F811
    """train.init_weights=<run dir>: step 0, the checkpoint's weights (consolidated from ZeRO 1)."""
    from retnet_train.inference.load import load_model
    from retnet_train.trainer import Trainer

    init_dist()
    first = tmp_path / "first"
    Trainer(typed(shards, first, **{"train.max_steps": 2, "checkpoint.interval": 2})).train()
    second = Trainer(typed(shards, tmp_path / "second", **{"train.init_weights": str(first)}))
    second.build()
    saved = load_model(str(first)).model.state_dict()
    started = second.engine.module.state_dict()
    assert second.state.step == 0 and saved.keys() == started.keys()
    assert all(torch.equal(saved[k], started[k].float()) for k in saved)
    fresh = Trainer(typed(shards, tmp_path / "third"))
    fresh.build()
    own = fresh.engine.module.state_dict()["embed_tokens.weight"].float()
    assert not torch.equal(own, saved["embed_tokens.weight"])  # without it: the run's own draws
