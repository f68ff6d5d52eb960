"""What a run refuses at start about its checkpoint dir and the checkpoint it resumes (another program's
step_N there, a run dir named as checkpoint.dir, no checkpoint where train.resume points, another data
stream, other model settings) comes from files every rank reads alike: with 2 ranks under torchrun, every
rank raises rank 0's refusal as a SameOnEveryRank, printed by rank 0 alone."""

import json

import pytest
from trainer_helpers import overrides, run_scenarios, shards, train  # noqa: F401 (shards: a fixture)

from retnet_train.components.rank_errors import SameOnEveryRank

POINTER = "error: rank 1: the same error as rank 0, which prints it"


def foreign_dir(root):
    """A checkpoint dir holding another program's step_00000003/ (no COMPLETE marker, a file no save writes)."""
    tag = root / "foreign" / "step_00000003"
    tag.mkdir(parents=True)
    (tag / "notes.txt").write_text("not a checkpoint")
    return root / "foreign"


@pytest.mark.slow
def test_every_rank_raises_rank_0s_refusal_of_the_checkpoint(shards, tmp_path):  # noqa: F811
    trained = tmp_path / "trained"
    run = lambda name, **extra: overrides(shards, tmp_path / name, **extra)  # noqa: E731
    resume = {"train.resume": str(trained)}
    refused = {
        "foreign_tag": run("a", **{"checkpoint.dir": foreign_dir(tmp_path)}),
        "run_dir": run("b", **{"checkpoint.dir": trained}),
        "nowhere": run("c", **{"train.resume": tmp_path / "nothing"}),
        "data_stream": run("d", **resume, **{"data.seed": 7}),  # check_parts
        "model": run("e", **resume, **{"model.n_heads": 4}),  # the resume plan
    }
    scenarios = [("trained", run("trained", **{"train.max_steps": 1}))]
    scenarios += [(name, args, SameOnEveryRank.__name__) for name, args in refused.items()]
    outcomes = run_scenarios(scenarios, nproc=2, workdir=tmp_path / "launch")  # another type ends the launch
    expected = {
        "foreign_tag": f"checkpoint.dir={tmp_path / 'foreign'} holds step_00000003, which this trainer did not write",
        "run_dir": f"checkpoint.dir={trained} is a run directory: its checkpoints are in {trained / 'checkpoints'}",
        "nowhere": f"train.resume={tmp_path / 'nothing'}: no complete checkpoint there",
        "data_stream": "data_loader: the data stream is not the checkpoint's: data.seed: 1234 -> 7;",
        "model": "was trained with other model settings (model.n_heads:",
    }
    for name, needle in expected.items():
        assert needle in outcomes[name].message, (name, outcomes[name].message)
        rank_1 = json.loads((tmp_path / "launch" / "scenarios" / name / "rank1.json").read_text())
        assert rank_1 == {"error": SameOnEveryRank.__name__, "message": outcomes[name].message}


@pytest.mark.slow
def test_a_checkpoint_dir_refusal_is_printed_once(shards, tmp_path):  # noqa: F811
    """The CLI under torchrun: rank 0 prints the refusal, rank 1 points at it."""
    args = overrides(shards, tmp_path / "run", **{"checkpoint.dir": foreign_dir(tmp_path)})
    proc = train(args, nproc=2, check=False, timeout=240)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert output.count("which this trainer did not write") == 1, output
    assert output.count(POINTER) == 1, output


@pytest.mark.slow
def test_a_gpu_only_setting_with_train_device_cpu_is_refused_as_rank_0s(shards, tmp_path):  # noqa: F811
    """A GPU retention backend or fp16 with train.device=cpu is the config's error, the same on every rank:
    printed by rank 0 alone (each rank printed it in full). 2 context-parallel ranks, as a long-context run."""
    cpu = {"train.device": "cpu", "parallel.context_parallel_size": 2}
    refused = {
        "triton": {"model.retention_backend": "triton"},
        "fla": {"model.retention_backend": "fla"},
        "fp16": {"deepspeed.precision": "fp16"},
    }
    scenarios = [
        (name, overrides(shards, tmp_path / name, **cpu, **extra), SameOnEveryRank.__name__)
        for name, extra in refused.items()
    ]
    outcomes = run_scenarios(scenarios, nproc=2, workdir=tmp_path / "launch")
    for name, needle in (("triton", "triton needs a CUDA"), ("fla", "fla needs a CUDA"), ("fp16", "fp16 needs a GPU")):
        assert needle in outcomes[name].message and "train.device=cpu" in outcomes[name].message, outcomes[name]
        rank_1 = json.loads((tmp_path / "launch" / "scenarios" / name / "rank1.json").read_text())
        assert rank_1 == {"error": SameOnEveryRank.__name__, "message": outcomes[name].message}
        assert not (tmp_path / name).exists(), name  # refused before anything is written
