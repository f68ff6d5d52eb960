"""A check at start that fails on one rank alone with an error other than a refusal, for real: 2 CPU ranks
(gloo) under torchrun, the trainer's command line with rank 1's look at its checkpoint dir failing
(failing_start.py). Every rank stops at once with the same error, naming rank 1 and what it raised, printed by
rank 0 alone: rank 0 waited in the check's collective until torchrun killed it, printing nothing. A refusal of
rank 1 alone names rank 1 too."""

import json
from pathlib import Path

import pytest
from failing_start import DAMAGED_JSON
from rank_faults import POINTER, launch_two_ranks  # (puts tests/train on the path first)
from trainer_helpers import make_shards, overrides

WRAPPER = Path(__file__).resolve().parent / "failing_start.py"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, why",
    [
        ("OSError", "PermissionError: [Errno 13] Permission denied: '{ckpts}'"),
        ("RuntimeError", "RuntimeError: rank 1 looked at {ckpts} and broke"),
    ],
)
def test_a_check_at_start_failing_on_rank_1_alone_stops_every_rank_with_one_error(shards, tmp_path, kind, why):
    run = tmp_path / "run"
    done = launch_two_ranks(WRAPPER, overrides(shards, run), {"FAILING_START": f"1:{kind}"}, tmp_path, timeout=150)
    errors, output = done.errors, done.output
    ckpts = run / "checkpoints"
    assert errors[0] == [
        f"error: checking checkpoint.dir={ckpts} and train.resume=auto failed on rank 1 ({why.format(ckpts=ckpts)})"
    ], output
    assert errors[1] == [POINTER], output  # printed once, by rank 0
    assert not any("Traceback" in text for text in done.ranks), output  # (torchrun prints its own for a failed rank)
    assert done.proc.returncode != 0
    assert done.seconds < 90, output  # no rank waited for the collectives' timeout (30 min) or torchrun's kill


def json_error() -> str:
    try:
        json.loads(DAMAGED_JSON)
    except ValueError as e:
        return str(e)
    raise AssertionError("DAMAGED_JSON reads")


@pytest.mark.slow
@pytest.mark.parametrize("ranks, printed", [("1", "rank 1 refused (rank 0 did not): {why}"), ("0,1", "{why}")])
def test_a_refusal_of_some_ranks_names_them(shards, tmp_path, ranks, printed):
    """A refusal (a ValueError) of rank 1 alone, from a file it alone reads damaged, was printed by rank 0 as if
    it were rank 0's and every rank's: it names rank 1; one every rank raises alike is printed as it is."""
    run = tmp_path / "run"
    done = launch_two_ranks(WRAPPER, overrides(shards, run), {"FAILING_START": f"{ranks}:ValueError"}, tmp_path, 150)
    assert done.errors == [[f"error: {printed.format(why=json_error())}"], [POINTER]], done.output
    assert done.proc.returncode != 0
    assert done.seconds < 90, done.output
