"""The trainer's MFU counts retention in the form the model runs: model.mode=parallel at seq_len 64 is one
chunk of 64 tokens, not chunks of model.chunk_size 16; with two context-parallel ranks, one of 32 on each."""

from __future__ import annotations

import pytest
from trainer_helpers import overrides, records, shards, train, typed  # noqa: F401

from retnet_train.model import model_config_from_dict
from retnet_train.model.flops import flops_per_token
from retnet_train.trainer import Trainer


def test_mfu_of_a_parallel_run_counts_the_parallel_form(shards, tmp_path, process_group):  # noqa: F811
    run = tmp_path / "run"
    cfg = typed(shards, run, **{"train.max_steps": 1, "model.mode": "parallel", "train.peak_flops": 1e12})
    trainer = Trainer(cfg)
    trainer.train()
    # d 64, value dim 128, 2 heads, 2 layers: per layer and token 2 C_eff (64 + 128) + 4 x 64 x 128 / 2, with
    # C_eff = (64 + 1) / 2 for one chunk of the whole sequence: 28,864 (chunks of 16 would count 19,648)
    six_n = flops_per_token(trainer.model_cfg, 64)["six_n"]
    assert trainer.flops == six_n + 3 * 2 * 28_864
    (rec,) = [r for r in records(run) if "mfu" in r]
    assert rec["mfu"] == pytest.approx(rec["tokens_per_s"] * trainer.flops / 1e12, rel=1e-9)


@pytest.mark.slow
def test_mfu_under_context_parallel_counts_each_ranks_form(shards, tmp_path):  # noqa: F811
    """2 ranks share each sequence of 64 tokens: each runs the parallel form on its 32, per layer and token
    2 x (32 + 1) / 2 x (64 + 128) + 16,384 = 22,720 (the whole sequence's 28,864 counted more than ran). Tokens
    are counted once per sequence (256 a step), the peak once per rank."""
    run = tmp_path / "run"
    extra = {"train.max_steps": 1, "model.mode": "parallel", "train.peak_flops": 1e12}
    train(overrides(shards, run, **extra, **{"parallel.context_parallel_size": 2}), nproc=2)
    six_n = flops_per_token(model_config_from_dict(typed(shards, run, **extra).model), 64)["six_n"]
    (rec,) = [r for r in records(run) if "mfu" in r]
    assert rec["tokens_seen"] == 256
    assert rec["mfu"] == pytest.approx(rec["tokens_per_s"] * (six_n + 3 * 2 * 22_720) / (1e12 * 2), rel=1e-9)
