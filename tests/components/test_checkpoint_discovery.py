"""Which checkpoint is the newest valid one (one answer for the trainer and the loaders): COMPLETE,
a model-states file, no torch file cut short; the newer ones passed over are named with the reason."""

import os

import pytest
import torch

from retnet_train.components import checkpoint_discovery as discovery
from retnet_train.components.checkpoint import CheckpointManager
from retnet_train.components.resume_source import resolve_resume


def save(directory, step, complete=True, files=("mp_rank_00_model_states.pt", "rng_rank0.pt")):
    tag_dir = directory / discovery.tag_for(step)
    tag_dir.mkdir(parents=True)
    for name in files:
        torch.save({"step": step, "w": torch.arange(1000.0)}, tag_dir / name)
    if complete:
        (tag_dir / discovery.COMPLETE).touch()
    (directory / discovery.LATEST).write_text(tag_dir.name)
    return tag_dir


def steps_there(directory) -> list:
    return sorted(int(t[len("step_") :]) for t in os.listdir(directory) if t.startswith("step_"))


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


def test_going_back_to_an_older_checkpoint_of_this_run_is_refused_while_newer_valid_ones_are_there(tmp_path):
    """They would stay beside the older one's continuation, and a later resume=auto (a requeue, a
    crash) would pick the newest of them instead of this run's saves."""
    manager = CheckpointManager(str(tmp_path), keep_last=5, rank=0)
    for step in (10, 20, 30):
        save(tmp_path, step)
    with pytest.raises(ValueError) as e:
        resolve_resume(str(tmp_path / "step_00000010"), manager)
    assert str(e.value).startswith(
        f"train.resume={tmp_path / 'step_00000010'}: this run's checkpoint dir {tmp_path} holds newer "
        "checkpoints (step_00000020, step_00000030) that a later train.resume=auto would continue from"
    )
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000010", "step_00000020", "step_00000030"]
    # the newest one, or the directory (its newest): nothing newer is left behind
    assert resolve_resume(str(tmp_path / "step_00000030"), manager) == (str(tmp_path), "step_00000030")
    assert resolve_resume(str(tmp_path), manager) == (str(tmp_path), "step_00000030")
    # newer ones that are damaged are never resumed: going back past them is what resume=auto does too
    truncate(tmp_path / "step_00000020" / "mp_rank_00_model_states.pt")
    (tmp_path / "step_00000030" / discovery.COMPLETE).unlink()
    assert resolve_resume(str(tmp_path / "step_00000010"), manager) == (str(tmp_path), "step_00000010")
    assert resolve_resume("auto", manager) == (str(tmp_path), "step_00000010")


class SavingEngine:
    """Writes the client state where DeepSpeed's save_checkpoint puts it: into the model-states file."""

    def save_checkpoint(self, directory, tag, client_state, save_latest):
        os.makedirs(os.path.join(directory, tag), exist_ok=True)
        torch.save(client_state, os.path.join(directory, tag, "mp_rank_00_model_states.pt"))


def saved_by(resume):
    return {"config": {"train": {"resume": resume}}}


def test_the_same_command_started_again_continues_from_its_own_checkpoints(tmp_path, capsys):
    """A run started from another run's checkpoint, preempted after saving its own and requeued with the
    same command, goes on from its own newest checkpoint instead of being refused."""
    other = CheckpointManager(str(tmp_path / "a" / "checkpoints"), keep_last=3, rank=0)
    for step in (5, 7):
        other.save(SavingEngine(), step, saved_by("auto"))
    mine = CheckpointManager(str(tmp_path / "b" / "checkpoints"), keep_last=3, rank=0)
    command = str(tmp_path / "a")
    assert resolve_resume(command, mine) == (other.dir, "step_00000007")
    mine.save(SavingEngine(), 8, saved_by(command))  # then SIGUSR1: exit 75, requeued
    capsys.readouterr()
    assert resolve_resume(command, mine) == (mine.dir, "step_00000008")
    assert f"train.resume={command}: {mine.dir}/step_00000008 was saved by this same run" in capsys.readouterr().out
    mine.save(SavingEngine(), 9, saved_by(command))
    save(tmp_path / "b" / "checkpoints", 10, complete=False)  # killed while saving: the newest valid one counts
    assert resolve_resume(command, mine) == (mine.dir, "step_00000009")
    # another command is still refused rather than overwriting this run's checkpoints
    with pytest.raises(ValueError, match="already holds checkpoints"):
        resolve_resume(str(tmp_path / "a" / "checkpoints" / "step_00000005"), mine)
    # the same one goes on also when the other run has meanwhile pruned the checkpoint it started from
    for tag in ("step_00000005", "step_00000007"):
        (tmp_path / "a" / "checkpoints" / tag / discovery.COMPLETE).unlink()
    assert resolve_resume(command, mine) == (mine.dir, "step_00000009")


def test_going_back_in_this_run_and_requeued_continues_from_the_new_saves(tmp_path):
    manager = CheckpointManager(str(tmp_path), keep_last=5, rank=0)
    manager.save(SavingEngine(), 10, saved_by("auto"))
    manager.save(SavingEngine(), 20, saved_by("auto"))
    truncate(tmp_path / "step_00000020" / "mp_rank_00_model_states.pt")  # damaged: going back is allowed
    command = str(tmp_path / "step_00000010")
    assert resolve_resume(command, manager) == (str(tmp_path), "step_00000010")
    manager.save(SavingEngine(), 15, saved_by(command))  # preempted at step 15, requeued
    assert resolve_resume(command, manager) == (str(tmp_path), "step_00000015")
    manager.save(SavingEngine(), 16, saved_by("auto"))  # the newest was saved by another command
    with pytest.raises(ValueError, match="holds newer checkpoints \\(step_00000015, step_00000016\\)"):
        resolve_resume(command, manager)


def test_pruning_counts_keep_last_up_to_the_new_save(tmp_path):
    """A damaged later checkpoint that the run resumed past does not push valid older ones out; a later
    save that never completed is removed, the damaged complete one stays until its step is saved again."""
    manager = CheckpointManager(str(tmp_path), keep_last=2, rank=0)
    for step in (10, 20, 30):
        save(tmp_path, step)
    save(tmp_path, 40, complete=False)
    truncate(tmp_path / "step_00000030" / "mp_rank_00_model_states.pt")
    assert resolve_resume("auto", manager) == (str(tmp_path), "step_00000020")
    manager.save(SavingEngine(), 25, {"step": 25})
    assert steps_there(tmp_path) == [20, 25, 30]
    manager.save(SavingEngine(), 30, {"step": 30})  # replaces the damaged save of step 30
    assert discovery.damage(str(tmp_path), "step_00000030") is None
    assert steps_there(tmp_path) == [25, 30]


def test_a_damaged_checkpoint_does_not_count_towards_keep_last(tmp_path):
    """Resumed from step 30 past a damaged step 40 (a shard cut short): the save of step 45 keeps the two
    newest usable checkpoints, 30 and 45; the damaged 40 stays while it is newer than the oldest kept
    (it may hold what someone wants to salvage) and goes once the window has passed it."""
    manager = CheckpointManager(str(tmp_path), keep_last=2, rank=0)
    for step in (20, 30, 40):
        save(tmp_path, step)
    truncate(tmp_path / "step_00000040" / "rng_rank0.pt")
    assert resolve_resume("auto", manager) == (str(tmp_path), "step_00000030")
    manager.save(SavingEngine(), 45, {"step": 45})
    assert steps_there(tmp_path) == [30, 40, 45]
    manager.save(SavingEngine(), 50, {"step": 50})
    assert steps_there(tmp_path) == [45, 50]


def test_checkpoints_are_ordered_by_step_not_by_name(tmp_path):
    """Past 10^8 steps the tag outgrows its zero padding: step_100000000 is newer than step_99999999."""
    for step in (99_999_999, 100_000_000):
        save(tmp_path, step)
    assert discovery.checkpoint_tags(str(tmp_path)) == ["step_99999999", "step_100000000"]
    assert discovery.choose(str(tmp_path)).tag == "step_100000000"


def test_a_checkpoint_one_step_newer_counts_as_newer(tmp_path):
    manager = CheckpointManager(str(tmp_path), keep_last=5, rank=0)
    save(tmp_path, 10)
    save(tmp_path, 11)
    with pytest.raises(ValueError, match=r"holds newer checkpoints \(step_00000011\)"):
        resolve_resume(str(tmp_path / "step_00000010"), manager)


class FailingEngine:
    """A save that dies before DeepSpeed wrote anything (a full disk, a killed rank)."""

    def save_checkpoint(self, directory, tag, client_state, save_latest):
        os.makedirs(os.path.join(directory, tag), exist_ok=True)
        raise OSError(28, "No space left on device")


def test_a_save_over_an_earlier_save_of_its_step_starts_from_an_empty_directory(tmp_path):
    """Resumed past a damaged step 20 (saved by 2 ranks), the run saves step 20 again on one rank: an
    interrupted save leaves no COMPLETE marker of the old one behind (it would pass for whole), and a
    finished one holds none of the old save's files (rank 1's RNG state would be restored on 2 ranks)."""
    manager = CheckpointManager(str(tmp_path), keep_last=3, rank=0)
    save(tmp_path, 10)
    save(tmp_path, 20, files=("mp_rank_00_model_states.pt", "rng_rank0.pt", "rng_rank1.pt"))
    truncate(tmp_path / "step_00000020" / "mp_rank_00_model_states.pt")
    assert resolve_resume("auto", manager) == (str(tmp_path), "step_00000010")
    with pytest.raises(OSError, match="No space left"):
        manager.save(FailingEngine(), 20, {"step": 20})
    assert not discovery.is_complete(str(tmp_path), "step_00000020")
    assert discovery.choose(str(tmp_path)).tag == "step_00000010"
    manager.save(SavingEngine(), 20, {"step": 20})
    tag_dir = tmp_path / "step_00000020"
    assert sorted(os.listdir(tag_dir)) == [discovery.COMPLETE, "mp_rank_00_model_states.pt", "rng_rank0.pt"]
    assert discovery.recorded_files(str(tag_dir)) == ["mp_rank_00_model_states.pt", "rng_rank0.pt"]


def test_tag_step_reads_back_what_tag_for_wrote_and_nothing_else():
    assert [discovery.tag_step(discovery.tag_for(s)) for s in (0, 7, 123_456_789)] == [0, 7, 123_456_789]
    assert [discovery.tag_step(t) for t in ("global_step100", "step_", "step_12a", "best", "12")] == [None] * 5
