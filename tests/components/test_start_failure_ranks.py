"""A check at start that fails on one rank alone with an error other than a refusal, for real: 2 CPU ranks
(gloo) under torchrun, the trainer's command line with rank 1's look at its checkpoint dir failing
(failing_start.py). Every rank stops at once with the same error, naming rank 1 and what it raised, printed by
rank 0 alone: rank 0 waited in the check's collective until torchrun killed it, printing nothing."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from trainer_helpers import REPO, env, make_shards, overrides  # noqa: E402

WRAPPER = Path(__file__).resolve().parent / "failing_start.py"
POINTER = "error: rank 1: the same error as rank 0, which prints it"


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
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    began = time.monotonic()
    proc = subprocess.run(
        [*torchrun, str(WRAPPER), *overrides(shards, run)],
        cwd=REPO,
        env={**env(), "FAILING_START": f"1:{kind}", "FAILING_START_LOGS": str(tmp_path), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=150,
    )
    took = time.monotonic() - began
    ranks = [(tmp_path / f"rank{rank}.stderr").read_text() for rank in (0, 1)]
    output = "".join(f"--- rank {rank}:\n{text}" for rank, text in enumerate(ranks)) + proc.stdout + proc.stderr
    errors = [[text for text in rank.splitlines() if text.startswith("error: ")] for rank in ranks]
    ckpts = run / "checkpoints"
    assert errors[0] == [
        f"error: checking checkpoint.dir={ckpts} and train.resume=auto failed on rank 1 ({why.format(ckpts=ckpts)})"
    ], output
    assert errors[1] == [POINTER], output  # printed once, by rank 0
    assert not any("Traceback" in text for text in ranks), output  # (torchrun prints its own for a failed rank)
    assert proc.returncode != 0
    assert took < 90, output  # no rank waited for the collectives' timeout (30 min) or torchrun's kill
