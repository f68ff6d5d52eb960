"""data.on_change=switch through the trainer: a run resumed with another data.* goes on from its
checkpoint's step, optimizer and schedule with a new stream in which the unchanged source continues
where it stopped; without the setting the same resume is refused naming it."""

import torch
from shard_fixtures import learnable_tokens, write_shard_dir
from trainer_helpers import VOCAB, make_shards, overrides, records, train

SEQUENCES_PER_STEP = 4  # train.global_batch_tokens 256 / data.seq_len 64


def client_state(run_dir, step):
    path = run_dir / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt"
    return torch.load(path, weights_only=False)


def test_a_resume_onto_added_data_switches_only_when_asked(tmp_path):
    web = make_shards(tmp_path / "web")
    code = tmp_path / "code"
    toks = learnable_tokens(30_000, VOCAB, seed=1)
    write_shard_dir(code, toks[:25_000], toks[25_000:], shard_tokens=8192, vocab_size=VOCAB)
    run = tmp_path / "run"
    train(overrides(web, run, **{"train.max_steps": 2, "checkpoint.interval": 2}), nproc=1)
    both = {"data.paths": f"[{web},{code}]", "data.weights": "[0.5,0.5]", "train.max_steps": 4}
    refused = train(overrides(web, run, **both), nproc=1, check=False)
    assert refused.returncode == 1
    assert "data.on_change=switch" in refused.stderr and "train.init_weights" in refused.stderr
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000002"]  # nothing written
    proc = train(overrides(web, run, **both, **{"data.on_change": "switch"}), nproc=1)
    assert "resumed from" in proc.stdout
    assert "data.on_change=switch: a new data stream from this step (source 'code' added; weights " in proc.stdout
    assert f"web at window {2 * SEQUENCES_PER_STEP} of " in proc.stdout and "code at its beginning" in proc.stdout
    assert [r["step"] for r in records(run) if "loss" in r] == [1, 2, 3, 4]
    state = client_state(run, 4)
    assert state["train_state"]["step"] == 4
    loader = state["data_loader"]
    assert loader["offsets"] == {"web": 2 * SEQUENCES_PER_STEP, "code": 0}
    assert loader["consumed_sequences"] == 2 * SEQUENCES_PER_STEP and set(loader["weights"]) == {"web", "code"}
