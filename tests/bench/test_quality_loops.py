"""The two loops of bench.quality train the same network alike: our trainer (DeepSpeed) on the
Transformer++ preset and the plain torch loop on transformers' LlamaForCausalLM, started from the same
weights (the Llama's, exported and given to ours as train.init_weights: --paired-init), on the same data
with gradient accumulation 2, log the same losses, gradient norms, learning rates and validation losses
step by step: equal to fp32 rounding in fp32, close in bf16."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "data"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "inference"))
from gen_fixtures import init_dist  # noqa: E402
from shard_fixtures import learnable_tokens, write_shard_dir  # noqa: E402

pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

VOCAB = 512
SMALL = "d_model=64,n_layers=2,n_heads=2,ffn_dim=192,vocab_size=512"  # the tiny preset, narrower
STEPS = 5
LOSS_RTOL = 1e-5  # fp32: measured ~2e-7 (the chunked loss and DeepSpeed's reductions sum in another order)
GRAD_NORM_RTOL = 1e-5  # measured ~2e-7
BF16_LOSS_RTOL, BF16_GRAD_NORM_RTOL = 2e-4, 1e-2  # measured 3e-5 and 1.2e-3
MIXED_LOSS_RTOL, MIXED_GRAD_NORM_RTOL = 2e-4, 1e-2  # measured 2.3e-5 and 7e-4


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    toks = learnable_tokens(12_000, VOCAB)
    directory = tmp_path_factory.mktemp("shards") / "syn"
    write_shard_dir(directory, toks[:10_000], toks[10_000:], shard_tokens=4096, vocab_size=VOCAB)
    return directory


def settings(shards, zero_stage: int, precision: str):
    from retnet_train.bench.quality import Settings

    return Settings(
        data=[str(shards)],
        tokenizer=None,
        size="tiny",
        tokens=STEPS * 256,
        seq_len=32,
        batch_tokens=256,  # micro-batch 4 x seq 32 x accumulation 2
        micro_batch=4,
        lr=3e-3,
        warmup_steps=2,
        min_lr_ratio=0.1,
        log_interval=1,
        eval_interval=2,
        eval_batches=2,
        zero_stage=zero_stage,
        precision=precision,
        grad_accum_dtype="fp32",
        compile=False,
        device="cpu",
        seed=1234,
        extra=["optim.weight_decay=0.1", "optim.grad_clip=0.5"],  # decay and clipping at work in a few steps
    )


def metrics(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_both(shards, tmp_path, zero_stage: int, precision: str, seen: dict | None = None) -> tuple:
    """bench.quality's two runs of the Transformer++ shape from the same weights: (ours, the plain loop's)
    metrics.jsonl records. `seen` gets our engine's weight dtypes and whether it ran under autocast."""
    from retnet_train.bench.llama_loop import export_llama_init, train_llama
    from retnet_train.bench.quality import compose, parse_model, trainer_overrides
    from retnet_train.trainer import Trainer

    init_dist()
    s = settings(shards, zero_stage, precision)
    runs = {}
    for name in ("transformer_pp", "llama"):
        overrides = trainer_overrides(s, parse_model(f"{name}:{SMALL}"), tmp_path / name)
        if name == "transformer_pp":  # bench.quality --paired-init
            overrides.append(f"train.init_weights={export_llama_init(compose(overrides), tmp_path / 'init')}")
        cfg = compose(overrides)
        assert (cfg.optim.weight_decay, cfg.optim.grad_clip, cfg.train.global_batch_tokens) == (0.1, 0.5, 2 * 4 * 32)
        if name == "transformer_pp":
            trainer = Trainer(cfg)
            trainer.train()
            engine = trainer.engine
            if seen is not None:
                seen["dtypes"] = {p.dtype for p in engine.module.parameters()}
                seen["autocast"] = engine.torch_autocast_enabled()
        else:
            train_llama(cfg)
        runs[name] = metrics(tmp_path / name)
    return runs["transformer_pp"], runs["llama"]


def compare(ours, ref, loss_rtol, grad_norm_rtol) -> None:
    train_ours, train_ref = [m for m in ours if "loss" in m], [m for m in ref if "loss" in m]
    assert [m["step"] for m in train_ours] == [m["step"] for m in train_ref] == list(range(1, STEPS + 1))
    for a, b in zip(train_ours, train_ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=loss_rtol), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=grad_norm_rtol), a["step"]
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12) and a["tokens_seen"] == b["tokens_seen"]
    val_ours = [(m["step"], m["val_loss"]) for m in ours if "val_loss" in m]
    val_ref = [(m["step"], m["val_loss"]) for m in ref if "val_loss" in m]
    assert [v[0] for v in val_ours] == [v[0] for v in val_ref] == [2, 4, 5]
    assert [v[1] for v in val_ours] == pytest.approx([v[1] for v in val_ref], rel=loss_rtol)
    assert all(m["grad_norm"] > 0.5 for m in train_ref)  # every step clipped
    assert train_ours[-1]["loss"] < train_ours[0]["loss"] - 0.05  # and the steps did train


@pytest.mark.parametrize("zero_stage", [1, 0])  # the benchmark's ZeRO 1; ZeRO 0 (fp32: GuardedAdamW)
def test_trainer_and_plain_loop_take_the_same_steps_in_fp32(shards, tmp_path, zero_stage):
    compare(*run_both(shards, tmp_path, zero_stage, "fp32"), LOSS_RTOL, GRAD_NORM_RTOL)


def test_in_bf16_they_differ_by_rounding_only(shards, tmp_path):
    """bf16: our bf16 weights and activations against autocast's fp32 weights and residual stream, both
    with fp32 gradient accumulation. A gradient summed twice or a mis-scaled one is off by far more."""
    compare(*run_both(shards, tmp_path, 1, "bf16"), BF16_LOSS_RTOL, BF16_GRAD_NORM_RTOL)


@pytest.mark.parametrize("zero_stage", [1, 0])  # DeepSpeed's ZeRO optimizer; ZeRO 0: GuardedAdamW
def test_bf16_mixed_is_the_plain_loops_autocast(shards, tmp_path, zero_stage):
    """deepspeed.precision=bf16-mixed: fp32 weights under DeepSpeed's torch_autocast, the plain loop's own
    precision. What differs is where each model rounds to bf16 (ours rotates q and k in fp32, the Llama
    in bf16) and the order of sums: as close as bf16 on this tiny model, off by far more if a gradient
    were summed twice or mis-scaled."""
    seen = {}
    ours, ref = run_both(shards, tmp_path, zero_stage, "bf16-mixed", seen)
    assert seen == {"dtypes": {torch.float32}, "autocast": True}
    compare(ours, ref, MIXED_LOSS_RTOL, MIXED_GRAD_NORM_RTOL)


def test_plain_loop_refuses_fp16():
    from types import SimpleNamespace

    from retnet_train.bench.llama_loop import train_llama

    with pytest.raises(ValueError) as e:
        train_llama(SimpleNamespace(deepspeed=SimpleNamespace(precision="fp16")))
    assert str(e.value) == (
        "llama: deepspeed.precision=fp16: the plain loop runs fp32 or autocast bf16 (bf16, bf16-mixed)"
    )
