"""Saving checkpoints where the filesystem fights back: a disk that fills up during a save, and a
checkpoint directory that holds step_<N> directories this trainer did not write."""

import errno
import io
import os

import pytest
import torch

from retnet_train.components import checkpoint_discovery as discovery
from retnet_train.components.checkpoint import CheckpointManager
from retnet_train.components.faults import io_failure
from retnet_train.components.resume_source import resolve_resume

MODEL_STATES = "mp_rank_00_model_states.pt"


class SavingEngine:
    """Writes the client state where DeepSpeed's save_checkpoint puts it: into the model-states file."""

    def save_checkpoint(self, directory, tag, client_state, save_latest):
        os.makedirs(os.path.join(directory, tag), exist_ok=True)
        torch.save(client_state, os.path.join(directory, tag, MODEL_STATES))


class FullDisk(io.RawIOBase):
    """A file on a disk with `room` bytes left: what fits is written, then the OS says ENOSPC."""

    def __init__(self, path, room):
        self.file, self.room = open(path, "wb"), room

    def writable(self):
        return True

    def write(self, data):
        if len(data) > self.room:
            self.file.write(bytes(data[: self.room]))
            self.file.close()
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.file.write(data)


class FullDiskEngine:
    """DeepSpeed's save on a full disk: torch.save's zip writer turns the failed write into a
    RuntimeError ('unexpected pos ...') that carries no OS error, and leaves the file cut short."""

    def save_checkpoint(self, directory, tag, client_state, save_latest):
        os.makedirs(os.path.join(directory, tag), exist_ok=True)
        torch.save({**client_state, "w": torch.zeros(4096)}, FullDisk(os.path.join(directory, tag, MODEL_STATES), 100))


def test_a_disk_filling_up_during_a_save_is_an_io_error_naming_the_checkpoint(tmp_path):
    manager = CheckpointManager(str(tmp_path), keep_last=1, rank=0)
    manager.save(SavingEngine(), 2, {"step": 2})
    with pytest.raises(OSError) as raised:
        manager.save(FullDiskEngine(), 4, {"step": 4})
    tag_dir = str(tmp_path / "step_00000004")
    assert raised.value.filename == tag_dir
    assert raised.value.strerror.startswith("saving the checkpoint failed (")
    assert "unexpected pos" in raised.value.strerror  # torch's own words are kept
    assert "free on its filesystem" in raised.value.strerror
    line = str(io_failure(raised.value, 4, str(tmp_path / "step_00000002")))  # what the trainer prints
    assert line.startswith(f"{tag_dir}: saving the checkpoint failed (")
    assert line.endswith(f"at step 4; the last checkpoint is {tmp_path / 'step_00000002'}")
    # the previous checkpoint is whole and is the one a restart takes; the cut-short save never counts
    assert discovery.choose(str(tmp_path)).tag == "step_00000002"
    assert discovery.damage(str(tmp_path), "step_00000002") is None
    assert not discovery.is_complete(str(tmp_path), "step_00000004")
    assert discovery.read_latest(str(tmp_path)) == "step_00000002"


def foreign_dir(directory, tag, files=("config.json", "model.pt")):
    """A step_<N> directory another program wrote (another trainer's checkpoint, a user's outputs)."""
    tag_dir = directory / tag
    tag_dir.mkdir(parents=True)
    for name in files:
        (tag_dir / name).write_text(name)
    return tag_dir


def test_a_checkpoint_dir_holding_step_dirs_of_another_program_is_refused_at_start(tmp_path):
    """Another program's step_1000/ has no COMPLETE marker: a fresh start there would prune it as an
    interrupted save at its first checkpoint. It is refused, naming it and a file in it, and kept."""
    foreign = foreign_dir(tmp_path, "step_1000")
    manager = CheckpointManager(str(tmp_path), keep_last=1, rank=0)
    with pytest.raises(ValueError) as raised:
        resolve_resume("auto", manager)
    assert str(raised.value).startswith(
        f"checkpoint.dir={tmp_path} holds step_1000, which this trainer did not write (config.json in it is no "
        "file a save writes; no COMPLETE marker): its saves would prune or replace them"
    )
    assert sorted(os.listdir(foreign)) == ["config.json", "model.pt"]


def test_pruning_and_replacing_leave_directories_of_another_program_alone(tmp_path):
    """Appeared while the run trained (so after the check at start): pruning passes over it, and a save of
    its step is refused rather than deleting it."""
    manager = CheckpointManager(str(tmp_path), keep_last=1, rank=0)
    manager.save(SavingEngine(), 10, {"step": 10})
    foreign_dir(tmp_path, "step_15")
    foreign_dir(tmp_path, "step_00000030")
    manager.save(SavingEngine(), 20, {"step": 20})
    assert sorted(t for t in os.listdir(tmp_path) if t.startswith("step_")) == [
        "step_00000020",
        "step_00000030",
        "step_15",
    ]
    with pytest.raises(ValueError, match="step_00000030, which this trainer did not write"):
        manager.save(SavingEngine(), 30, {"step": 30})
    assert sorted(os.listdir(tmp_path / "step_00000030")) == ["config.json", "model.pt"]


def test_an_interrupted_save_of_this_trainer_is_still_pruned(tmp_path):
    """What a save killed midway leaves (DeepSpeed's shards, an RNG state, COMPLETE.tmp) is this trainer's."""
    manager = CheckpointManager(str(tmp_path), keep_last=1, rank=0)
    files = ("zero_pp_rank_0_mp_rank_00_model_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt")
    foreign_dir(tmp_path, "step_00000015", files + ("rng_rank0.pt", "COMPLETE.tmp"))
    assert resolve_resume("auto", manager) is None
    manager.save(SavingEngine(), 20, {"step": 20})
    assert sorted(t for t in os.listdir(tmp_path) if t.startswith("step_")) == ["step_00000020"]


def test_a_fresh_start_past_an_interrupted_first_save_says_what_it_passed_over(tmp_path, capsys):
    """Killed during its first save, the run has no whole checkpoint: the same command starts fresh and
    says which one it passed over and why, as a resume past a newer broken one does."""
    foreign_dir(tmp_path, "step_00000002", ("mp_rank_00_model_states.pt",))  # no COMPLETE: killed midway
    assert resolve_resume("auto", CheckpointManager(str(tmp_path), keep_last=1, rank=0)) is None
    assert capsys.readouterr().out == (
        f"no whole checkpoint in {tmp_path}; passed over: step_00000002: {discovery.NOT_COMPLETE}\n"
    )
    assert resolve_resume("auto", CheckpointManager(str(tmp_path), keep_last=1, rank=1)) is None
    assert capsys.readouterr().out == ""  # rank 0 says it


def test_a_checkpoint_dir_naming_another_runs_run_dir_is_refused(tmp_path):
    """checkpoint.dir=<a run dir> (its checkpoints under checkpoints/): the run would start fresh beside
    them instead of continuing them, and write its checkpoints into that run's directory."""
    other = CheckpointManager(str(tmp_path / "a" / "checkpoints"), keep_last=1, rank=0)
    other.save(SavingEngine(), 2, {"step": 2})
    with pytest.raises(ValueError) as raised:
        resolve_resume("auto", CheckpointManager(str(tmp_path / "a"), keep_last=1, rank=0))
    assert str(raised.value) == (
        f"checkpoint.dir={tmp_path / 'a'} is a run directory: its checkpoints are in {tmp_path / 'a' / 'checkpoints'}. "
        f"checkpoint.dir={tmp_path / 'a' / 'checkpoints'} continues that run; train.resume={tmp_path / 'a'} starts "
        "from its newest checkpoint in a run.dir of your own"
    )
    assert sorted(os.listdir(tmp_path / "a")) == ["checkpoints"]


@pytest.mark.parametrize("kind", ["another program's pointer", "a symlink"])
def test_a_latest_this_trainer_did_not_write_is_refused_rather_than_replaced(tmp_path, kind):
    """Every save replaces <checkpoint.dir>/latest: one that names no checkpoint this trainer can use (another
    DeepSpeed program's global_step100/ without a COMPLETE marker, a user's symlink to a run) is refused at
    start instead of being overwritten by the first save."""
    if kind == "a symlink":
        (tmp_path / "run_17").mkdir()
        (tmp_path / "latest").symlink_to(tmp_path / "run_17")
        why = "a symlink"
    else:
        foreign_dir(tmp_path, "global_step100", ("mp_rank_00_model_states.pt",))
        (tmp_path / "latest").write_text("global_step100")
        why = f"it names global_step100: {discovery.NOT_COMPLETE}"
    with pytest.raises(ValueError) as raised:
        resolve_resume("auto", CheckpointManager(str(tmp_path), keep_last=1, rank=0))
    assert str(raised.value).startswith(
        f"checkpoint.dir={tmp_path} holds a `latest` that this trainer did not write ({why}): its saves would "
        "replace it"
    )
    assert os.path.lexists(tmp_path / "latest")


class CutShortEngine:
    """A save whose model-states file ends up cut short without any error on the way (a network filesystem
    losing the end of a file, a node dying as its cache is written back)."""

    def save_checkpoint(self, directory, tag, client_state, save_latest):
        SavingEngine().save_checkpoint(directory, tag, client_state, save_latest)
        path = os.path.join(directory, tag, MODEL_STATES)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)


class VanishingEngine:
    """A save one of whose files is gone by the time COMPLETE has listed it (a shared filesystem showing a
    file to the ranks that wrote it, not yet to rank 0's later look)."""

    def save_checkpoint(self, directory, tag, client_state, save_latest):
        SavingEngine().save_checkpoint(directory, tag, client_state, save_latest)
        torch.save({}, os.path.join(directory, tag, "zero_pp_rank_1_mp_rank_00_optim_states.pt"))


@pytest.mark.parametrize("damage", ["a file cut short", "a file gone", "latest not written"])
def test_a_save_that_ends_up_damaged_prunes_no_older_checkpoint(tmp_path, monkeypatch, capsys, damage):
    """Pruning deletes older checkpoints only once the new save is checked whole (checkpoint_discovery.damage,
    the check a resume chooses by, and `latest` naming it): keeping the last 1 after a damaged save deleted the
    last good one and left only the damaged one."""
    manager = CheckpointManager(str(tmp_path), keep_last=1, rank=0)
    manager.save(SavingEngine(), 2, {"step": 2})
    engine = SavingEngine()
    if damage == "a file cut short":
        engine = CutShortEngine()
    elif damage == "a file gone":
        engine = VanishingEngine()
        mark_complete = discovery.mark_complete

        def mark_then_lose(tag_dir, files):
            mark_complete(tag_dir, files)
            os.remove(os.path.join(tag_dir, "zero_pp_rank_1_mp_rank_00_optim_states.pt"))

        monkeypatch.setattr(discovery, "mark_complete", mark_then_lose)
    else:
        replace = os.replace  # the pointer's rename reported done, but `latest` still names step 2
        lost = lambda src, dst: os.remove(src) if dst.endswith("latest") else replace(src, dst)  # noqa: E731
        monkeypatch.setattr(os, "replace", lost)
    capsys.readouterr()
    manager.save(engine, 4, {"step": 4})
    assert discovery.damage(str(tmp_path), "step_00000002") is None  # kept, whole
    whole = "step_00000004" if damage == "latest not written" else "step_00000002"
    assert discovery.choose(str(tmp_path)).tag == whole  # what a resume takes
    assert discovery.read_latest(str(tmp_path)) == "step_00000002"
    err = capsys.readouterr().err
    assert f"warning: {tmp_path / 'step_00000004'} fails its check after saving (" in err, err
    assert err.rstrip().endswith("checkpoints older than it are kept"), err
