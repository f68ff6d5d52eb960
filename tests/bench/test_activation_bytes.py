"""Bytes a block keeps for backward per token: RetNet's block keeps no more than the Transformer's, at
the 1.3B presets' ratios scaled to a tiny width (RetNet: 8 heads, value dim 2d, FFN 2d, chunk = key head
dim as in retnet_1.3b_8k's 256/256; Transformer: 16 heads, FFN 4d), eager and compiled as the trainer
compiles (parallelize, activation memory budget 0.8); the CLI prints those figures, one line per model."""

import functools
import json

import pytest
import torch

from retnet_train.bench.activation_bytes import layer_bytes_per_token, main
from retnet_train.bench.presets import load_preset

D = 128
RETNET = load_preset(
    "1.3b", vocab_size=512, d_model=D, n_heads=8, ffn_dim=2 * D, chunk_size=16, retention_backend="torch"
)
TRANSFORMER = load_preset("transformer_1.3b", vocab_size=512, d_model=D, n_heads=16, ffn_dim=4 * D)


@pytest.fixture
def inductor_partitioning(monkeypatch):
    """torch.compile with inductor's decompositions and partitioner but no code generation: what is kept
    is what inductor keeps (checked: equal bytes on this block), without minutes of C++ builds."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager_decomp_partition"))


def per_layer(cfg, **kw):
    return layer_bytes_per_token(cfg, 2, 256, torch.device("cpu"), doc_len=64, **kw)


def test_retnet_layer_keeps_no_more_than_a_transformer_layer_eager():
    retnet, transformer = per_layer(RETNET), per_layer(TRANSFORMER)
    assert retnet["bytes_per_token"] <= transformer["bytes_per_token"], (retnet, transformer)
    # nothing chunk-sized: no [.., C, C] scores and no [.., K, V] chunk states (chunk 16, K 16, V 32)
    assert not [t for t in retnet["tensors"] if t[1][-2:] in ([16, 16], [16, 32], [32, 16])], retnet["tensors"]


@pytest.mark.slow
def test_retnet_layer_keeps_no_more_than_a_transformer_layer_compiled(inductor_partitioning):
    retnet = per_layer(RETNET, compile=True, activation_memory_budget=0.8)
    transformer = per_layer(TRANSFORMER, compile=True, activation_memory_budget=0.8)
    assert retnet["bytes_per_token"] <= transformer["bytes_per_token"], (retnet, transformer)
    assert retnet["bytes_per_token"] < per_layer(RETNET)["bytes_per_token"]


@pytest.mark.slow
def test_selective_checkpointing_is_counted_in_the_compiled_block(inductor_partitioning):
    """Recomputing the projections and the retention core (train.activation_checkpointing=selective)
    keeps the core's output o (2d wide) and its inputs q, k (d each) and v (2d) out of what the block
    saves, in bf16: the compiled block's saved tensors show it."""
    kept = per_layer(RETNET, compile=True, activation_memory_budget=0.8)
    selective = per_layer(RETNET, compile=True, activation_memory_budget=0.8, activation_checkpointing="selective")
    assert selective["bytes_per_token"] <= kept["bytes_per_token"] - 2 * (2 * D + D + D + 2 * D), (selective, kept)


def test_cli_prints_one_line_per_model_on_cpu(capsys):
    main(["--cpu", "--preset", "tiny", "--seq-len", "32", "--models", "retnet@chunk_size=16,transformer"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["model"], r["overrides"]) for r in rows] == [("retnet", {"chunk_size": 16}), ("transformer", {})]
    retnet = layer_bytes_per_token(load_preset("tiny", chunk_size=16), 1, 32, torch.device("cpu"))
    assert rows[0] == {
        "model": "retnet",
        "overrides": {"chunk_size": 16},
        "preset": "tiny",
        "seq_len": 32,
        "micro_batch": 1,
        "compile": False,
        "activation_memory_budget": 1.0,
        "activation_checkpointing": "none",
        "bytes_per_token_per_layer": round(retnet["bytes_per_token"], 1),
        "bytes_per_token_by_tensor": retnet["tensors"][:16],
    }
    assert rows[0]["bytes_per_token_per_layer"] > 0 and len(rows[0]["bytes_per_token_by_tensor"]) == 16


def test_cli_refusals(capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        main(["--cpu", "--preset", "tiny", "--activation-memory-budget", "0.5"])
    assert e.value.code == 2 and "error: --activation-memory-budget needs --compile" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--cpu", "--preset", "tiny", "--activation-checkpointing", "selective"])
    assert e.value.code == 2 and "error: --activation-checkpointing needs --compile" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"^--models: fla's model is not measured here \(retnet, transformer\)$"):
        main(["--cpu", "--preset", "tiny", "--models", "fla"])
    with pytest.raises(SystemExit, match=r"^--models: fla's model is not measured here"):
        main(["--cpu", "--preset", "tiny", "--seq-len", "32", "--models", "retnet@chunk_size=16,fla"])
    assert capsys.readouterr().out == ""  # refused before retnet was measured, not after
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match=r"^activation_bytes: no GPU \(--cpu: measure on CPU\)$"):
        main(["--preset", "tiny"])


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--micro-batch", "0"], "argument --micro-batch: needs an integer >= 1: '0'"),
        (["--seq-len", "0"], "argument --seq-len: needs an integer >= 1: '0'"),
        (["--backend", "nope"], "argument --backend: invalid choice: 'nope'"),
        # a budget out of range, a GPU backend on --cpu and a negative document length raised tracebacks or
        # ran a meaningless measurement
        (["--compile", "--activation-memory-budget", "1.5"], "error: --activation-memory-budget 1.5 is not in (0, 1]"),
        (["--compile", "--activation-memory-budget", "0"], "error: --activation-memory-budget 0.0 is not in (0, 1]"),
        (["--backend", "fla"], "error: --backend fla needs a GPU: on --cpu, auto or torch"),
        (["--backend", "triton"], "error: --backend triton needs a GPU: on --cpu, auto or torch"),
        (["--doc-len", "-1"], "argument --doc-len: needs an integer >= 0: '-1'"),
    ],
)
def test_bad_arguments_are_named_before_the_forward(capsys, args, needle):
    """--micro-batch 0 ran a forward and died dividing by zero tokens; a backend name failed in the
    model's config with a traceback."""
    with pytest.raises(SystemExit) as e:
        main(["--cpu", "--preset", "tiny", *args])
    assert e.value.code == 2 and needle in capsys.readouterr().err


@pytest.mark.parametrize(
    "models, needle",
    [
        ("retnet@bogus=1", "--models: 'retnet@bogus=1': model.bogus: unknown key for arch=retnet"),
        ("transformer@n_heads=3", "--models: 'transformer@n_heads=3': model.n_heads: 3 does not divide"),
    ],
)
def test_a_preset_override_the_model_refuses_is_named_not_a_traceback(capsys, models, needle):
    with pytest.raises(SystemExit) as e:
        main(["--cpu", "--preset", "tiny", "--models", models])
    assert str(e.value.code).startswith(needle)
    assert capsys.readouterr().out == ""
