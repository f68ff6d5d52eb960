"""Resuming when the newest checkpoint is damaged: the trainer takes the newest valid older one, says
which and why, trains on exactly as from that one, and its next save of the damaged step replaces it."""

import pytest
from trainer_helpers import losses, shards, typed  # noqa: F401 (shards: a fixture)

from retnet_train.components import checkpoint_discovery as discovery
from retnet_train.trainer import Trainer

MODEL_STATES, OPTIM_STATES = "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def config(shards, run_dir, steps):
    # ZeRO-1: the optimizer state is a file of its own
    return typed(
        shards,
        run_dir,
        **{"train.max_steps": steps, "checkpoint.interval": 2, "checkpoint.keep_last": 5, "deepspeed.zero_stage": 1},
    )


def cut_short(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("fault", ["model states cut short", "optimizer states missing"])
def test_resume_falls_back_past_a_damaged_newest_checkpoint(shards, tmp_path, process_group, capsys, fault):
    run_dir = tmp_path / "run"
    Trainer(config(shards, run_dir, 4)).train()
    ckpts = run_dir / "checkpoints"
    assert sorted(discovery.recorded_files(str(ckpts / "step_00000004"))) == [
        MODEL_STATES,
        "rng_rank0.pt",
        OPTIM_STATES,
    ]  # what COMPLETE lists
    first = losses(run_dir)
    if fault == "model states cut short":
        cut_short(ckpts / "step_00000004" / MODEL_STATES)
        why = f"{MODEL_STATES} is truncated or damaged"
    else:
        (ckpts / "step_00000004" / OPTIM_STATES).unlink()
        why = f"{OPTIM_STATES} is missing: it was written with the checkpoint"
    capsys.readouterr()

    Trainer(config(shards, run_dir, 6)).train()
    out = capsys.readouterr().out
    assert f"using checkpoint {ckpts / 'step_00000002'}; skipped newer: step_00000004: {why}" in out
    assert f"resumed from {ckpts / 'step_00000002'} at step 2" in out
    assert f"{ckpts / 'step_00000004'}: replacing an earlier save of step 4" in out
    again = losses(run_dir)  # the resumed run's lines come later in metrics.jsonl and win
    assert [again[s] for s in (3, 4)] == [first[s] for s in (3, 4)]  # as from step 2 the first time
    assert sorted(again) == [1, 2, 3, 4, 5, 6]
    assert discovery.damage(str(ckpts), "step_00000004") is None
