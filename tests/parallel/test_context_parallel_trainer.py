"""The trainer with parallel.context_parallel_size: same losses as one rank on the same global batch;
bad layouts fail at start naming the key."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "train"))
from trainer_helpers import losses, overrides, records, run_scenarios, shards, train  # noqa: E402,F401 (shards: a fixture)

from retnet_train.components.config import TrainConfig, check_values, grad_accumulation  # noqa: E402
from retnet_train.parallel import ContextParallel, check_layout, parallelize  # noqa: E402

KEY = "parallel.context_parallel_size"
# 3 steps of 2 micro-batches of 2 sequences of 64 tokens (global 256 tokens), validation at step 3
STEPS = {"train.max_steps": 3, "train.eval_interval": 3}
TWO_RANKS = {
    "cp2 zero0": {KEY: 2},
    # ZeRO 1 and recomputation: the state exchange runs again inside the backward pass
    "cp2 zero1 selective": {KEY: 2, "deepspeed.zero_stage": 1, "train.activation_checkpointing": "selective"},
    "dp2": {},
    # the 8k experiments compile the blocks: the exchange must survive torch.compile, also when
    # the compiled backward recomputes elementwise work (activation_memory_budget < 1). Last: the
    # budget is process-wide.
    "cp2 compiled": {KEY: 2, "train.compile": "true", "train.activation_memory_budget": 0.8},
}


def losses_and_val(run_dir):
    return losses(run_dir), [r["val_loss"] for r in records(run_dir) if "val_loss" in r]


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory):
    """name -> (losses, validation losses) of every run here: one rank and 4 ranks (2 x 2) each
    from the CLI, and the four 2-rank runs in one torchrun launch (run_scenarios: the start-up once)."""
    root = tmp_path_factory.mktemp("cp_runs")
    train(overrides(shards, root / "one", **STEPS), nproc=1)
    train(overrides(shards, root / "dp2cp2", **STEPS, **{KEY: 2, "deepspeed.zero_stage": 1}), nproc=4)
    dirs = {name: root / name.replace(" ", "_") for name in TWO_RANKS}
    run_scenarios(
        [(name, overrides(shards, dirs[name], **STEPS, **extra)) for name, extra in TWO_RANKS.items()],
        nproc=2,
        workdir=root / "launch",
    )
    return {name: losses_and_val(root / name) for name in ("one", "dp2cp2")} | {
        name: losses_and_val(d) for name, d in dirs.items()
    }


@pytest.mark.slow
def test_context_parallel_trainer_equals_one_rank(runs):
    ref, ref_val = runs["one"]
    assert sorted(ref) == [1, 2, 3] and len(ref_val) == 1
    for name in ("cp2 zero0", "cp2 zero1 selective", "cp2 compiled"):
        got, val = runs[name]
        assert sorted(got) == [1, 2, 3], name
        for step in ref:
            assert abs(got[step] - ref[step]) <= 1e-5, (name, step, got[step], ref[step])
        assert abs(val[0] - ref_val[0]) <= 1e-5, (name, val, ref_val)


@pytest.mark.slow
def test_data_and_context_parallel_together(runs):
    """4 ranks = 2 data-parallel groups x 2 context-parallel ranks equal 2 data-parallel ranks: the
    loader per data-parallel rank and DeepSpeed's average over all 4 ranks give the same gradient."""
    ref, _ = runs["dp2"]
    got, _ = runs["dp2cp2"]
    assert sorted(got) == sorted(ref) == [1, 2, 3]
    for step in ref:
        assert abs(got[step] - ref[step]) <= 1e-5, (step, got[step], ref[step])


def test_world_not_divisible_names_the_key(shards, tmp_path):
    proc = train(overrides(shards, tmp_path / "run", **{KEY: 2}), nproc=1, check=False, timeout=120)
    assert proc.returncode != 0
    assert KEY in proc.stderr and "world size 1" in proc.stderr


def test_bad_values_name_the_key():
    cfg = TrainConfig()
    cfg.data.paths, cfg.data.seq_len = ["/d/web"], 100
    cfg.parallel.context_parallel_size = 3
    with pytest.raises(ValueError, match=f"{KEY}.*data.seq_len=100"):
        check_values(cfg)
    cfg.parallel.context_parallel_size = 0
    with pytest.raises(ValueError, match=KEY):
        check_values(cfg)
    with pytest.raises(ValueError, match=f"{KEY}=2 does not divide the world size 3"):
        check_layout(2, 3, 64)
    with pytest.raises(ValueError, match=f"{KEY}=4 does not divide data.seq_len=66"):
        check_layout(4, 8, 66)


def test_batch_counts_data_parallel_ranks_only():
    cfg = TrainConfig()
    cfg.data.seq_len, cfg.train.micro_batch_size, cfg.train.global_batch_tokens = 8192, 1, 2**20
    cfg.parallel.context_parallel_size = 4
    assert grad_accumulation(cfg, 8) == 2**20 // (8192 * 2)
    with pytest.raises(ValueError, match=KEY):
        grad_accumulation(cfg, 6)


def test_transformer_is_refused():
    from retnet_train.model import TransformerConfig, TransformerForCausalLM

    model = TransformerForCausalLM(TransformerConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, ffn_dim=64))
    with pytest.raises(ValueError, match=f"{KEY}=2 needs a RetNet"):
        parallelize(model, context_parallel=ContextParallel(None, 0, 2))
