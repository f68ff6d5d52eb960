"""The numbers in metrics.jsonl against what the step really did: the learning rate the update used
and the tokens counted over gradient accumulation, also across a resume."""

from __future__ import annotations

import pytest
from trainer_helpers import records, shards, typed  # noqa: F401  (shards: a fixture)

from retnet_train.components.optim import lr_lambda
from retnet_train.trainer import Trainer

LR, WARMUP = 3e-3, 4
# 256 tokens per step: micro-batch 2 x seq_len 64 x accumulation 2 on one rank
SCHEDULE = {"optim.lr": LR, "optim.warmup_steps": WARMUP, "optim.decay": "linear", "checkpoint.save_at_end": "true"}


def used_lr(step: int, max_steps: int) -> float:
    """The rate optimizer step `step` (1-based) updates with: LambdaLR's factor at index step - 1."""
    return LR * lr_lambda(step - 1, WARMUP, max_steps, "linear", 0.0)


def train_records(run_dir) -> dict:
    return {r["step"]: r for r in records(run_dir) if "lr" in r}


def test_logged_lr_is_the_rate_of_the_logged_step(shards, tmp_path, process_group):  # noqa: F811
    run = tmp_path / "run"
    trainer = Trainer(typed(shards, run, **{**SCHEDULE, "train.max_steps": 3}))
    trainer.train()
    assert trainer.accum == 2
    recs = train_records(run)
    assert sorted(recs) == [1, 2, 3]
    # warm-up: step 1 updates with lr / 4, step 2 with 2 lr / 4 (not the next step's rate)
    assert [recs[s]["lr"] for s in (1, 2, 3)] == pytest.approx([LR / 4, LR / 2, 3 * LR / 4], rel=1e-12)
    assert [recs[s]["tokens_seen"] for s in (1, 2, 3)] == [256, 512, 768]

    # resumed at step 3 with a longer run: the schedule goes on from where the update left it
    Trainer(typed(shards, run, **{**SCHEDULE, "train.max_steps": 6})).train()
    recs = train_records(run)
    assert [recs[s]["lr"] for s in (4, 5, 6)] == pytest.approx([used_lr(s, 6) for s in (4, 5, 6)], rel=1e-12)
    assert recs[4]["lr"] == pytest.approx(LR, rel=1e-12)  # the warm-up's last step
    assert [recs[s]["tokens_seen"] for s in (4, 5, 6)] == [1024, 1280, 1536]
