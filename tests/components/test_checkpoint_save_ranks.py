"""A save that fails on one rank alone, for real: 2 CPU ranks (gloo) under torchrun, the trainer's command line
with one write of rank 1 failing (failing_save.py). Every rank stops with the same error naming the checkpoint
and rank 1, printed by rank 0 alone (rank 1 points at it), and the launch ends at once: rank 0 waited in the
save's next collective until torchrun killed it, printing nothing."""

from pathlib import Path

import pytest
from rank_faults import POINTER, launch_two_ranks  # (puts tests/train on the path first)
from trainer_helpers import make_shards, overrides

from retnet_train.components import checkpoint_discovery as discovery

WRAPPER = Path(__file__).resolve().parent / "failing_save.py"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault, zero_stage, why",
    [
        # after DeepSpeed's save: the trainer's own RNG state file cannot be created
        ("rng_rank1.pt:OSError", 0, "Disk quota exceeded: {tag_dir}/rng_rank1.pt"),
        # inside DeepSpeed's save: rank 1's optimizer shard, cut short by a full disk
        (
            "*rank_1_mp_rank_00_optim_states.pt:RuntimeError",
            1,
            "[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0; ",
        ),
    ],
)
def test_a_save_failing_on_rank_1_alone_stops_every_rank_with_the_same_error(shards, tmp_path, fault, zero_stage, why):
    run = tmp_path / "run"
    args = overrides(
        shards, run, **{"train.max_steps": 2, "checkpoint.interval": 1, "deepspeed.zero_stage": zero_stage}
    )
    fault = {"FAILING_SAVE": f"1:step_00000002/{fault}"}
    done = launch_two_ranks(WRAPPER, args, fault, tmp_path, timeout=300)
    errors, output = done.errors, done.output
    ckpts = run / "checkpoints"
    tag_dir = ckpts / "step_00000002"
    line = f"error: {tag_dir}: saving the checkpoint failed on rank 1 ({why.format(tag_dir=tag_dir)}"
    assert len(errors[0]) == 1 and errors[1] == [POINTER], output  # the same on every rank: printed by rank 0
    (error,) = errors[0]
    assert error.startswith(line), output
    assert error.endswith(f" at step 2; the last checkpoint is {ckpts / 'step_00000001'}"), output
    assert done.proc.returncode != 0
    assert done.seconds < 120, output  # no rank waited for the collectives' timeout (30 min) or torchrun's kill
    assert discovery.choose(str(ckpts)).tag == "step_00000001"  # what the same command resumes from
    assert not discovery.is_complete(str(ckpts), "step_00000002")
