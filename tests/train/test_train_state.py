"""TrainState and the checkpoint's client state (one entry per stateful part): round trips, the upgrade
of the flat layout older checkpoints have, and an exact resume from such a checkpoint."""

import json
import os
import shutil

import pytest
import torch
from trainer_helpers import losses, shards, typed  # noqa: F401 (shards: a fixture)

from retnet_train.components.checkpoint import client_state, load_parts, upgrade_client_state
from retnet_train.components.faults import NonFiniteTracker
from retnet_train.components.train_state import TrainState
from retnet_train.data.manifest import MANIFEST_NAME
from retnet_train.inference.load import load_model
from retnet_train.trainer import Trainer

FLAT = {
    "data": {"consumed_sequences": 8},
    "step": 3,
    "tokens_seen": 768,
    "wandb_id": "w1",
    "faults": {"consecutive": 1, "total": 2},
    "config": {"run": {"dir": "r"}},
    "layout": {"world_size": 1},
}


def test_train_state_round_trip_through_a_file(tmp_path):
    state = TrainState(step=12, tokens_seen=3072, wandb_id="abc", faults=NonFiniteTracker(5))
    state.faults.update(True, True)
    state.faults.update(False, True)
    torch.save(state.state_dict(), tmp_path / "state.pt")
    restored = TrainState(faults=NonFiniteTracker(5))
    restored.load_state_dict(torch.load(tmp_path / "state.pt"))
    assert restored.state_dict() == {
        "step": 12,
        "tokens_seen": 3072,
        "wandb_id": "abc",
        "faults": {"consecutive": 2, "total": 2},
    }
    assert restored.faults.max_consecutive == 5  # the stop rule is the config's, not the checkpoint's


def test_client_state_holds_one_entry_per_part():
    state = TrainState(step=4, tokens_seen=1024)
    client = client_state({"train_state": state}, config={"a": 1}, layout={"world_size": 2})
    assert client == {"train_state": state.state_dict(), "config": {"a": 1}, "layout": {"world_size": 2}}
    assert upgrade_client_state(client) is client  # today's layout is left as it is
    fresh = TrainState()
    load_parts(client, {"train_state": fresh}, "ckpt/step_00000004")
    assert (fresh.step, fresh.tokens_seen) == (4, 1024)
    with pytest.raises(ValueError, match="ckpt/step_00000004 holds no data_loader state"):
        load_parts(client, {"train_state": fresh, "data_loader": TrainState()}, "ckpt/step_00000004")


def test_flat_client_state_of_older_checkpoints_is_upgraded():
    assert upgrade_client_state(dict(FLAT)) == {
        "train_state": {"step": 3, "tokens_seen": 768, "wandb_id": "w1", "faults": {"consecutive": 1, "total": 2}},
        "data_loader": {"consumed_sequences": 8},
        "config": {"run": {"dir": "r"}},
        "layout": {"world_size": 1},
    }
    # the oldest: neither W&B id nor fault counters
    oldest = upgrade_client_state({"data": {}, "step": 3, "tokens_seen": 768})
    state = TrainState(wandb_id="kept?", faults=NonFiniteTracker(5))
    state.faults.total = 9
    state.load_state_dict(oldest["train_state"])
    assert (state.step, state.tokens_seen, state.wandb_id, state.faults.total) == (3, 768, None, 9)


def config(shards, run_dir, **extra):
    return typed(
        shards, run_dir, **{"train.max_steps": 4, "checkpoint.interval": 2, "checkpoint.keep_last": 5, **extra}
    )


def test_checkpoint_in_the_flat_layout_resumes_exactly(shards, tmp_path, process_group, capsys):
    reference = tmp_path / "reference"
    Trainer(config(shards, reference)).train()  # steps 1-4 in one go

    # the same first two steps, saved as the trainer's client state looked before it held one entry per part
    old_run = tmp_path / "old"
    first = Trainer(
        config(
            shards, old_run, **{"train.max_steps": 2, "checkpoint.interval": 1000, "checkpoint.save_at_end": "false"}
        )
    )
    first.train()
    assert not (old_run / "checkpoints").exists()
    flat = {
        "data": first.loader.state_dict(),
        "step": first.state.step,
        "tokens_seen": first.state.tokens_seen,
        "wandb_id": first.state.wandb_id,
        "faults": first.state.faults.state_dict(),
        "config": first.resolved,
        "layout": first.layout,
    }
    first.ckpt.save(first.engine, first.state.step, flat)
    capsys.readouterr()

    summary = Trainer(config(shards, old_run)).train()
    assert (
        f"resumed from {old_run / 'checkpoints' / 'step_00000002'} at step 2 (512 tokens seen)"
        in capsys.readouterr().out
    )
    assert summary["step"] == 4 and summary["tokens_seen"] == 4 * 256
    ref, got = losses(reference), losses(old_run)
    assert sorted(got) == [1, 2, 3, 4]
    assert [got[s] for s in (3, 4)] == [ref[s] for s in (3, 4)]  # bitwise: data position, RNG, optimizer
    client = torch.load(os.path.join(summary["checkpoint"], "mp_rank_00_model_states.pt"), weights_only=False)
    assert client["train_state"]["step"] == 4 and client["data_loader"]["consumed_sequences"] == 4 * 4
    assert "step" not in client and "data" not in client


@pytest.mark.parametrize("add_bos", [True, False])
def test_checkpoint_records_whether_documents_start_with_bos(shards, tmp_path, process_group, add_bos):
    """The shards' framing (data_prep.tokenize --bos) is a fact of every checkpoint, read back at inference."""
    data = tmp_path / "shards"
    shutil.copytree(shards, data)
    manifest = json.loads((data / MANIFEST_NAME).read_text())
    (data / MANIFEST_NAME).write_text(json.dumps({**manifest, "add_bos": add_bos}))
    summary = Trainer(config(data, tmp_path / "run", **{"train.max_steps": 1})).train()
    client = torch.load(os.path.join(summary["checkpoint"], "mp_rank_00_model_states.pt"), weights_only=False)
    assert client["documents_start_with_bos"] is add_bos
    assert load_model(str(tmp_path / "run")).documents_start_with_bos is add_bos
