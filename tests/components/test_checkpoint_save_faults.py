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
