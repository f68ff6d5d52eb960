"""Which start errors each rank prints: the config's, the same on every rank, once by rank 0; a rank's
own in full; and a rank that only points at rank 0's message leaves once the launcher stops it."""

import os
import signal
import threading
import time

import pytest

from retnet_train.components import rank_errors
from retnet_train.components.rank_errors import SameOnEveryRank, print_error
from retnet_train.train import checked_config


@pytest.mark.parametrize(
    "override, message",
    [
        ("+train.max_step=2", "train.max_step: not a key of the trainer config"),  # typed_config
        ("deepspeed.zero_stage=7", "deepspeed.zero_stage: 7 is not 0-3"),  # check_values
        # the model section: every rank printed these in full, after the process group and the run dir,
        # the values' naming the config class (RetNetConfig.n_heads) instead of the key
        ("+model.d_modle=64", "^model.d_modle: unknown key for arch=retnet"),
        ("model.n_heads=3", "^model.n_heads: 3 does not divide d_model=128$"),
        ("model.chunk_size=0", "^model.chunk_size: must be an integer >= 1, got 0$"),
    ],
)
def test_a_config_problem_is_the_same_on_every_rank(tmp_path, override, message):
    from retnet_train.preflight import compose_trainer_config

    composed = compose_trainer_config(["experiment=tiny_cpu", f"run.dir={tmp_path}", override])
    with pytest.raises(SameOnEveryRank, match=message):
        checked_config(composed)


def test_rank_0_prints_in_full_and_the_others_point_at_it(monkeypatch, capsys):
    waits = []
    monkeypatch.setattr(rank_errors, "wait_for_rank_0", lambda: waits.append(1) or True)
    shared, own = SameOnEveryRank("train.max_steps: must be >= 1"), ValueError("data.paths[0]=/x: no such file")
    for rank in (0, 3):
        print_error(shared, rank)
        print_error(own, rank)
    assert capsys.readouterr().err.splitlines() == [
        "error: train.max_steps: must be >= 1",
        "error: data.paths[0]=/x: no such file",
        "error: rank 3: the same error as rank 0, which prints it",
        "error: data.paths[0]=/x: no such file",
    ]
    assert waits == [1]  # the pointer waits for rank 0 to go first


def test_a_rank_that_rank_0_does_not_outlast_prints_the_error_in_full(monkeypatch, capsys):
    """No stop signal within the wait (rank 0 slow to start, or gone): the message is printed again
    rather than risk that nobody prints it."""
    monkeypatch.setattr(rank_errors, "wait_for_rank_0", lambda: False)
    print_error(SameOnEveryRank("train.max_steps: must be >= 1"), 1)
    assert capsys.readouterr().err.splitlines() == ["error: train.max_steps: must be >= 1"]


def test_the_wait_says_whether_the_stop_signal_came():
    assert rank_errors.wait_for_rank_0(timeout=0.1) is False


def test_the_wait_for_rank_0_ends_at_the_launchers_stop_signal():
    """torchrun SIGTERMs the other ranks once rank 0 has exited: they leave then, not at the timeout."""
    before = signal.getsignal(signal.SIGTERM)
    threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
    began = time.monotonic()
    assert rank_errors.wait_for_rank_0(timeout=30) is True
    assert time.monotonic() - began < 10
    assert signal.getsignal(signal.SIGTERM) == before  # the handler it installed to wait is gone
