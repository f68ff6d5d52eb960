"""components/rng.py: a rank's RNG state round trip, and CUDA states that load on another machine shape."""

import os
import random

import numpy as np
import pytest
import torch

from retnet_train.components import rng
from retnet_train.components.checkpoint import CheckpointManager
from retnet_train.components.rng import load_rng_state, rng_state, seed_everything


def draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_round_trip_continues_every_generator():
    seed_everything(7)
    draws()
    state = rng_state()
    expected = draws()
    seed_everything(8)
    load_rng_state(state)
    assert draws() == expected


class FakeCuda:
    """torch.cuda on `count` devices, this process on `current`: per-device generator states; like
    torch, setting the state of a device that is not there fails."""

    def __init__(self, monkeypatch, count, current):
        self.count, self.current = count, current
        self.states = {i: torch.tensor([i], dtype=torch.uint8) for i in range(count)}
        for module in (torch.cuda, torch.cuda.random):
            monkeypatch.setattr(module, "device_count", lambda: self.count)
            monkeypatch.setattr(module, "get_rng_state", self.get)
            monkeypatch.setattr(module, "set_rng_state", self.set)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def index(self, device):
        return self.current if device == "cuda" else int(device)

    def get(self, device="cuda"):
        return self.states[self.index(device)].clone()

    def set(self, new_state, device="cuda"):
        index = self.index(device)
        if index >= self.count:
            raise IndexError("tuple index out of range")  # torch.cuda.default_generators[index]
        self.states[index] = new_state.clone()


def test_cuda_state_is_this_ranks_device_and_loads_where_fewer_devices_are_visible(monkeypatch):
    saved_on = FakeCuda(monkeypatch, count=8, current=5)  # rank 5 of a node of 8
    saved_on.states[5] = torch.tensor([55], dtype=torch.uint8)
    state = rng_state()
    assert state["cuda_device"].tolist() == [55]

    resumed_on = FakeCuda(monkeypatch, count=4, current=1)  # the same rank on a node of 4 GPUs
    load_rng_state(state)
    assert {i: s.tolist() for i, s in resumed_on.states.items()} == {0: [0], 1: [55], 2: [2], 3: [3]}


def test_older_checkpoints_with_every_devices_state_load_on_fewer_devices(monkeypatch):
    cuda = FakeCuda(monkeypatch, count=4, current=0)
    state = {**rng_state(), "cuda": [torch.tensor([100 + i], dtype=torch.uint8) for i in range(8)]}
    del state["cuda_device"]
    load_rng_state(state)
    assert [cuda.states[i].tolist() for i in range(4)] == [[100], [101], [102], [103]]


@pytest.mark.parametrize("key", ["cuda_device", "cuda"])
def test_a_cuda_state_is_ignored_without_cuda(monkeypatch, key):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(rng.torch.cuda, "set_rng_state", lambda *a: pytest.fail("no CUDA to set"))
    load_rng_state({**rng_state(), key: torch.zeros(1, dtype=torch.uint8)})


class ClientStateEngine:
    """DeepSpeed's save and load of the client state (the model-states file), nothing else."""

    def save_checkpoint(self, directory, tag, client_state, save_latest):
        os.makedirs(os.path.join(directory, tag), exist_ok=True)
        torch.save(client_state, os.path.join(directory, tag, "mp_rank_00_model_states.pt"))

    def load_checkpoint(self, directory, tag):
        return tag, torch.load(os.path.join(directory, tag, "mp_rank_00_model_states.pt"), weights_only=False)


def test_a_rank_without_a_saved_rng_state_reseeds_by_seed_rank_and_step(tmp_path):
    """Resumed on more ranks than saved: rank 0 continues its saved generators; rank 1, which has no
    rng_rank1.pt, seeds with train.seed + rank + 1_000_003 x step, which no rank started with (a run
    seeds train.seed + rank): its dropout and sampling do not replay those of the run's first steps."""
    engine = ClientStateEngine()
    seed_everything(5)
    CheckpointManager(str(tmp_path), keep_last=3, rank=0).save(engine, 7, {"train_state": {"step": 7}})
    expected = draws()
    seed_everything(0)
    CheckpointManager(str(tmp_path), keep_last=3, rank=0).load(engine, "step_00000007", reseed=1234)
    assert draws() == expected
    CheckpointManager(str(tmp_path), keep_last=3, rank=1).load(engine, "step_00000007", reseed=1234)
    assert torch.initial_seed() == 1234 + 1 + 1_000_003 * 7
    resumed = draws()
    seed_everything(1234 + 1 + 1_000_003 * 7)
    assert resumed == draws()
