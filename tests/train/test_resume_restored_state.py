"""A resume on another layout (world size, ZeRO stage, gradient-accumulation dtype, context parallel)
restores, bit for bit, the state the checkpoint was saved from: every parameter's fp32 weight, module
weight and Adam moments, the Adam step, the LR schedule, the train state, the data position and each
rank's RNG. Each case trains 2 steps and saves; restored_state.py records the trainer's state as it saved
and, in a run on the other layout, what Trainer.restore() gave back (gloo, CPU)."""

import random

import numpy as np
import pytest
import torch
from trainer_helpers import overrides, run_scenarios, shards  # noqa: F401 (shards: a fixture)

AT = 2  # the step saved and resumed
COMMON = {
    "train.max_steps": AT,
    "checkpoint.interval": AT,
    # in warm-up: a restarted schedule would give another LR
    "optim.warmup_steps": 4,
    "optim.decay": "linear",
}
BF16 = {"deepspeed.precision": "bf16"}
CASES = {  # name: (saved world size, its overrides, resumed world size, its overrides)
    "bf16_z1_2to1": (2, {**BF16, "deepspeed.zero_stage": 1}, 1, {**BF16, "deepspeed.zero_stage": 1}),
    "bf16_z3_1to2": (1, {**BF16, "deepspeed.zero_stage": 3}, 2, {**BF16, "deepspeed.zero_stage": 3}),
    # DeepSpeed's BF16_Optimizer (fp32 gradient accumulation) -> its ZeRO 1/2 optimizer
    "bf16_z1_fp32_accum_2to_z2_1": (
        2,
        {**BF16, "deepspeed.zero_stage": 1, "deepspeed.grad_accum_dtype": "fp32"},
        1,
        {**BF16, "deepspeed.zero_stage": 2},
    ),
    "cp2_z1_2to1": (
        2,
        {"deepspeed.zero_stage": 1, "parallel.context_parallel_size": 2},
        1,
        {"deepspeed.zero_stage": 1},
    ),
}
RESEED_STEP = 1_000_003  # a rank the checkpoint has no RNG for seeds train.seed + rank + this * step


@pytest.fixture(scope="module")
def records(shards, tmp_path_factory):  # noqa: F811
    """case -> (the saving run's records, the resumed run's), one per rank, from three launches:
    1 rank saves, 2 ranks save and resume the 1-rank checkpoints, 1 rank resumes the 2-rank ones."""
    root = tmp_path_factory.mktemp("restored_state")

    def saving(case):
        _, extra, _, _ = CASES[case]
        return f"{case}_saved", overrides(shards, root / f"{case}_saved", **{**COMMON, **extra})

    def resuming(case):
        _, _, _, extra = CASES[case]
        source = root / f"{case}_saved" / "checkpoints" / f"step_{AT:08d}"
        return f"{case}_resumed", overrides(
            shards, root / f"{case}_resumed", **{**COMMON, **extra, "train.resume": source}
        )

    def launch(scenarios, nproc, name):
        run_scenarios(scenarios, nproc, root / name, script="restored_state.py")

    on = {world: [case for case, spec in CASES.items() if spec[0] == world] for world in (1, 2)}
    launch([saving(c) for c in on[1]], 1, "launch1")
    launch([saving(c) for c in on[2]] + [resuming(c) for c in on[1]], 2, "launch2")
    launch([resuming(c) for c in on[2]], 1, "launch3")

    def read(name):
        files = sorted(root.glob(f"launch*/scenarios/{name}/rank*.pt"))
        return [torch.load(f, weights_only=False) for f in files]

    return {case: (read(f"{case}_saved"), read(f"{case}_resumed")) for case in CASES}


def global_rows(ranks):
    """The next step's token rows of every data-parallel rank (the ranks of a context-parallel group read
    the same rows), as a sorted list: the global batch, whatever the world size."""
    by_dp = {r["dp_rank"]: r["next_rows"] for r in ranks}
    return sorted(map(tuple, torch.cat([by_dp[d] for d in sorted(by_dp)]).tolist()))


def reseeded(seed):
    return {
        "python": random.Random(seed).getstate(),
        "numpy": np.random.RandomState(seed % 2**32).get_state(),
        "torch": torch.Generator().manual_seed(seed).get_state(),
    }


def same_rng(a, b):
    return (
        a["python"] == b["python"]
        and all(np.array_equal(x, y) for x, y in zip(a["numpy"], b["numpy"]))
        and torch.equal(a["torch"], b["torch"])
    )


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_a_resume_on_another_layout_restores_the_saved_state_bit_for_bit(records, case):
    saved, restored = records[case]
    assert (len(saved), len(restored)) == (CASES[case][0], CASES[case][2])
    want, got = saved[0], restored[0]  # gathered over the ZeRO partitions: the same on every rank
    assert got["parameters"].keys() == want["parameters"].keys()
    for name, tensors in want["parameters"].items():
        for key, tensor in tensors.items():  # fp32 weight, module weight (bf16 under bf16), exp_avg, exp_avg_sq
            other = got["parameters"][name][key]
            assert other.dtype == tensor.dtype and torch.equal(other, tensor), (name, key)
    assert want["adam_steps"] == [float(AT)]
    for key in ("adam_steps", "param_groups", "scheduler", "train_state", "loader"):
        assert got[key] == want[key], key
    assert global_rows(restored) == global_rows(saved)
    # rank r's RNG is the one rank r saved; a rank beyond the saved world size re-seeds as documented
    # (CheckpointManager.load)
    for rank, record in enumerate(restored):
        expected = saved[rank]["rng"] if rank < len(saved) else reseeded(record["seed"] + rank + RESEED_STEP * AT)
        assert same_rng(record["rng"], expected), rank
