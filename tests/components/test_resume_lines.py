"""The console lines of a run's start and end: what it resumed, and where its metrics and checkpoint are."""

from omegaconf import OmegaConf

from retnet_train.components.config import TrainConfig
from retnet_train.components.resume import done_line, resumed_lines
from retnet_train.components.train_state import TrainState


def resolved_config() -> dict:
    return OmegaConf.to_container(OmegaConf.structured(TrainConfig()), resolve=True)


def test_done_line_names_the_final_checkpoint():
    assert done_line(6, "runs/m/metrics.jsonl", "runs/m/checkpoints/step_00000006") == (
        "done at step 6: metrics in runs/m/metrics.jsonl, checkpoint in runs/m/checkpoints/step_00000006"
    )


def test_done_line_without_a_final_save_says_so_and_names_the_last_checkpoint():
    """checkpoint.save_at_end=false: no checkpoint at all, or an interval's (or the resumed one) before the end."""
    assert done_line(2, "runs/m/metrics.jsonl", None) == (
        "done at step 2: metrics in runs/m/metrics.jsonl, no checkpoint saved (checkpoint.save_at_end=false)"
    )
    assert done_line(6, "runs/m/metrics.jsonl", "runs/m/checkpoints/step_00000004") == (
        "done at step 6: metrics in runs/m/metrics.jsonl, no checkpoint of step 6 (checkpoint.save_at_end=false); "
        "the last one is runs/m/checkpoints/step_00000004"
    )


def test_settings_newer_than_the_checkpoint_at_their_defaults_are_no_change():
    """A checkpoint saved before a setting existed: the setting at the schema's default is not listed as
    changed; set to anything else, or a whole section new and set, it is."""
    saved = resolved_config()
    del saved["data"]["on_change"], saved["optim"]["decay_fraction"]
    now = resolved_config()
    state = TrainState(step=3, tokens_seen=96)
    first = "resumed from ckpt/step_3 at step 3 (96 tokens seen)"
    assert resumed_lines("ckpt/step_3", state, [], saved, now) == [first]
    now["data"]["on_change"], now["train"]["max_steps"] = "switch", 9
    assert resumed_lines("ckpt/step_3", state, [], saved, now)[1] == (
        f"config changed since that checkpoint: data.on_change: <absent> -> switch; "
        f"train.max_steps: {saved['train']['max_steps']} -> 9"
    )
    del saved["profile"]
    assert resumed_lines("ckpt/step_3", state, [], saved, resolved_config())[1:] == []
