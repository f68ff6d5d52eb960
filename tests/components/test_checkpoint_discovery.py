"""Which checkpoint is the newest valid one (one answer for the trainer and the loaders): COMPLETE,
a model-states file, no torch file cut short; the newer ones passed over are named with the reason."""

import os

import pytest
import torch

from retnet_train.components import checkpoint_discovery as discovery
from retnet_train.components.checkpoint import CheckpointManager, resolve_resume


def save(directory, step, complete=True, files=("mp_rank_00_model_states.pt", "rng_rank0.pt")):
    tag_dir = directory / discovery.tag_for(step)
    tag_dir.mkdir(parents=True)
    for name in files:
        torch.save({"step": step, "w": torch.arange(1000.0)}, tag_dir / name)
    if complete:
        (tag_dir / discovery.COMPLETE).touch()
    (directory / discovery.LATEST).write_text(tag_dir.name)
    return tag_dir


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_whole_checkpoint_has_no_damage_and_each_fault_is_named(tmp_path):
    tag_dir = save(tmp_path, 1)
    assert discovery.damage(str(tmp_path), tag_dir.name) is None
    truncate(tag_dir / "rng_rank0.pt")
    assert discovery.damage(str(tmp_path), tag_dir.name).startswith("rng_rank0.pt is truncated or damaged")
    (tag_dir / "rng_rank0.pt").write_bytes(b"")
    assert discovery.damage(str(tmp_path), tag_dir.name) == "rng_rank0.pt is empty file"
    (tag_dir / "rng_rank0.pt").unlink()
    (tag_dir / "mp_rank_00_model_states.pt").unlink()
    assert discovery.damage(str(tmp_path), tag_dir.name) == "no *_model_states.pt in it"
    assert discovery.damage(str(tmp_path), "step_00000009") == "no such checkpoint directory"
    (tag_dir / discovery.COMPLETE).unlink()
    assert discovery.damage(str(tmp_path), tag_dir.name).startswith("no COMPLETE marker: the save was interrupted")


def test_newest_valid_wins_and_the_skipped_ones_are_named(tmp_path):
    save(tmp_path, 10)
    save(tmp_path, 20)
    truncate(tmp_path / "step_00000020" / "mp_rank_00_model_states.pt")
    save(tmp_path, 30, complete=False)  # `latest` names it: a save killed before its marker
    choice = discovery.choose(str(tmp_path))
    assert choice.tag == "step_00000010"
    assert choice.note() == (
        f"using checkpoint {tmp_path / 'step_00000010'}; skipped newer: step_00000030: "
        f"{discovery.NOT_COMPLETE}; step_00000020: mp_rank_00_model_states.pt is truncated or "
        "damaged (File is not a zip file)"
    )
    # the run dir finds the same; nothing damaged: no note
    assert discovery.find_checkpoint(str(tmp_path)).tag == "step_00000010"
    clean = tmp_path / "clean"
    save(clean / "checkpoints", 5)
    assert discovery.find_checkpoint(str(clean)).path == str(clean / "checkpoints" / "step_00000005")
    assert discovery.find_checkpoint(str(clean)).note() is None


def test_latest_pointing_nowhere_and_foreign_tags(tmp_path):
    save(tmp_path, 10)
    (tmp_path / discovery.LATEST).write_text("step_00000099")  # pruned, or hand-edited
    assert discovery.choose(str(tmp_path)).tag == "step_00000010"
    foreign = tmp_path / "ds"
    (foreign / "global_step7").mkdir(parents=True)
    torch.save({}, foreign / "global_step7" / "mp_rank_00_model_states.pt")
    (foreign / discovery.LATEST).write_text("global_step7")
    choice = discovery.choose(str(foreign))  # DeepSpeed's own save: no COMPLETE marker
    assert choice.tag is None and choice.skipped == [f"latest names global_step7: {discovery.NOT_COMPLETE}"]
    (foreign / "global_step7" / discovery.COMPLETE).touch()
    assert discovery.choose(str(foreign)).tag == "global_step7"


def test_a_named_checkpoint_is_taken_only_when_valid(tmp_path):
    tag_dir = save(tmp_path, 3)
    assert discovery.find_checkpoint(str(tag_dir)).path == str(tag_dir)
    truncate(tag_dir / "mp_rank_00_model_states.pt")
    choice = discovery.find_checkpoint(str(tag_dir))
    assert choice.tag is None and choice.reasons().startswith("step_00000003: mp_rank_00_model_states.pt is truncated")


def test_trainer_resume_says_which_checkpoint_and_why_newer_ones_were_skipped(tmp_path, capsys):
    manager = CheckpointManager(str(tmp_path), keep_last=3, rank=0)
    save(tmp_path, 10)
    save(tmp_path, 20)
    truncate(tmp_path / "step_00000020" / "rng_rank0.pt")
    assert resolve_resume("auto", manager) == (str(tmp_path), "step_00000010")
    out = capsys.readouterr().out
    assert (
        f"using checkpoint {tmp_path / 'step_00000010'}; skipped newer: step_00000020: rng_rank0.pt is truncated" in out
    )
    # rank 1 resumes the same checkpoint without printing
    assert resolve_resume("auto", CheckpointManager(str(tmp_path), 3, 1)) == (str(tmp_path), "step_00000010")
    assert capsys.readouterr().out == ""
    # every complete checkpoint damaged: an error, not a fresh start that would prune them
    truncate(tmp_path / "step_00000010" / "mp_rank_00_model_states.pt")
    with pytest.raises(ValueError, match="train.resume=auto: no checkpoint in .* can be resumed .*step_00000020"):
        resolve_resume("auto", manager)
    with pytest.raises(ValueError, match="step_00000010: mp_rank_00_model_states.pt is truncated"):
        resolve_resume(str(tmp_path / "step_00000010"), CheckpointManager(str(tmp_path / "other"), 3, 0))
    assert os.path.isdir(tmp_path / "step_00000010")
