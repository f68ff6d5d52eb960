"""The numbers in metrics.jsonl against what the step really did: the learning rate the update used
and the tokens counted over gradient accumulation, also across a resume; the validation loss of each
source when the run trains on several."""

from __future__ import annotations

import math

import pytest
from trainer_helpers import VOCAB, learnable_tokens, records, shards, typed, write_shard_dir  # noqa: F401

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
    # one source: its loss is val_loss, no val_loss/<source>
    assert [sorted(r) for r in records(run) if "val_loss" in r] == [["step", "val_loss", "val_ppl"]]

    # resumed at step 3 with a longer run: the schedule goes on from where the update left it
    Trainer(typed(shards, run, **{**SCHEDULE, "train.max_steps": 6})).train()
    recs = train_records(run)
    assert [recs[s]["lr"] for s in (4, 5, 6)] == pytest.approx([used_lr(s, 6) for s in (4, 5, 6)], rel=1e-12)
    assert recs[4]["lr"] == pytest.approx(LR, rel=1e-12)  # the warm-up's last step
    assert [recs[s]["tokens_seen"] for s in (4, 5, 6)] == [1024, 1280, 1536]


def test_each_source_logs_its_validation_loss(shards, tmp_path, process_group):  # noqa: F811
    """data.paths=[shards, code]: val_loss/<directory name> of both, val_loss their token-weighted mean."""
    code = tmp_path / "code"
    toks = learnable_tokens(26_000, VOCAB, seed=7) // 3 + 5  # another corpus (another loss), as many windows
    write_shard_dir(code, toks[:16_000], toks[16_000:], shard_tokens=8192, vocab_size=VOCAB)
    run = tmp_path / "run"
    paths = {"data.paths": f"[{shards},{code}]", "data.weights": "[0.5,0.5]", "train.max_steps": 1}
    Trainer(typed(shards, run, **paths)).train()
    (val,) = [r for r in records(run) if "val_loss" in r]
    assert sorted(val) == ["step", "val_loss", "val_loss/code", f"val_loss/{shards.name}", "val_ppl"]
    web_loss, code_loss = val[f"val_loss/{shards.name}"], val["val_loss/code"]
    assert all(math.isfinite(v) for v in (web_loss, code_loss)) and abs(web_loss - code_loss) > 1e-3
    # eval_batches 2 x micro-batch 2: two windows of each source (of equal size), each of seq_len labelled tokens
    assert val["val_loss"] == pytest.approx((web_loss + code_loss) / 2, rel=1e-9)
    assert val["val_ppl"] == pytest.approx(math.exp(val["val_loss"]), rel=1e-9)


def test_eval_interval_zero_trains_without_validation(tmp_path, process_group):  # noqa: F811
    """train.eval_interval=0: no validation pass and no validation split needed (shards without one)."""
    data, run = tmp_path / "no_val", tmp_path / "run"
    write_shard_dir(data, learnable_tokens(20_000, VOCAB, seed=3), None, shard_tokens=8192, vocab_size=VOCAB)
    trainer = Trainer(typed(data, run, **{"train.max_steps": 2, "train.eval_interval": 0}))
    trainer.train()
    assert trainer.val_loader is None
    assert sorted(r["step"] for r in records(run) if "loss" in r) == [1, 2]
    assert not [r for r in records(run) if "val_loss" in r]


def test_log_cadence_interval_skipped_and_last_steps(shards, tmp_path, process_group):  # noqa: F811
    """train.log_interval=2 over 5 steps, step 3 non-finite: logged at the interval (2, 4), at the skipped
    step (3, loss None) and at the last step (5) though off the interval. train.eval_interval=2: validation
    at steps 2, 4 and the last, 5."""
    run = tmp_path / "run"
    extra = {
        "train.max_steps": 5,
        "train.log_interval": 2,
        "train.eval_interval": 2,
        "train.inject_nonfinite_at": "[3]",
    }
    summary = Trainer(typed(shards, run, **extra)).train()
    recs = train_records(run)
    assert sorted(recs) == [2, 3, 4, 5]
    assert [recs[s]["loss"] is None for s in (2, 3, 4, 5)] == [False, True, False, False]
    assert [recs[s]["skipped_steps"] for s in (2, 3, 4, 5)] == [0, 1, 1, 1]
    assert (summary["step"], summary["skipped_steps"], summary["loss"]) == (5, 1, recs[5]["loss"])
    assert [r["step"] for r in records(run) if "val_loss" in r] == [2, 4, 5]


def test_summary_loss_is_the_last_trained_steps(shards, tmp_path, process_group):  # noqa: F811
    """The last step skipped (NaN loss): the summary's loss is step 1's, not the skipped step's."""
    run = tmp_path / "run"
    summary = Trainer(typed(shards, run, **{"train.max_steps": 2, "train.inject_nonfinite_at": "[2]"})).train()
    recs = train_records(run)
    assert recs[2]["loss"] is None and math.isfinite(recs[1]["loss"])
    assert (summary["step"], summary["skipped_steps"], summary["loss"]) == (2, 1, recs[1]["loss"])


def test_logged_loss_is_the_mean_over_micro_batches(shards, tmp_path, process_group):  # noqa: F811
    """Step 1 (weights as initialised) over the same 4 sequences: 2 micro-batches of 2 log the loss that
    one micro-batch of 4 does, the mean of both, not the last micro-batch's."""
    logged = {}
    for mbs in (2, 4):
        run = tmp_path / f"mbs{mbs}"
        trainer = Trainer(typed(shards, run, **{"train.max_steps": 1, "train.micro_batch_size": mbs}))
        trainer.train()
        assert trainer.accum == 4 // mbs
        logged[mbs] = train_records(run)[1]["loss"]
    assert logged[2] == pytest.approx(logged[4], rel=1e-5)


def test_too_many_nonfinite_steps_save_the_stopping_step(shards, tmp_path, process_group):  # noqa: F811
    """max_consecutive_nonfinite=2, NaN loss at steps 2 and 3: the run stops at step 3 with an error
    that names the checkpoint it saved there (the weights step 1 made), off the checkpoint interval."""
    from retnet_train.components.faults import TrainingError

    run = tmp_path / "run"
    extra = {"train.max_steps": 6, "train.inject_nonfinite_at": "[2,3]", "train.max_consecutive_nonfinite": 2}
    trainer = Trainer(typed(shards, run, **extra))
    with pytest.raises(TrainingError) as e:
        trainer.train()
    assert trainer.state.step == 3
    ckpt = run / "checkpoints" / "step_00000003"
    assert trainer.last_checkpoint == str(ckpt) and ckpt.is_dir()
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_")) == [ckpt.name]
    assert "weights of the last good step (1)" in str(e.value)
