"""train_throughput's MFU counts the FLOPs of the model it measured: fla's RetNet (a SwiGLU FFN, its own
widths) from its own config and parameters, not from our preset's."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from retnet_train.bench import throughput_measure
from retnet_train.bench.presets import fla_flops_per_token, load_preset
from retnet_train.model.flops import flops_per_token


def fla_config(d=2048, layers=24, heads=8, vocab=32000, tied=False):
    """The fields of fla's RetNetConfig that fla_reference sets or that its FLOPs depend on."""
    return SimpleNamespace(
        hidden_size=d,
        num_hidden_layers=layers,
        num_heads=heads,
        expand_k=1.0,
        expand_v=2.0,
        vocab_size=vocab,
        tie_word_embeddings=tied,
    )


def fla_1p3b_params(d=2048, layers=24, vocab=32000, ffn=2816, heads=8):
    """fla's RetNetForCausalLM at the 1.3B preset's size, counted by hand: q, k (d x d), v, g (d x 2d),
    o (2d x d), the per-head gated norm (2d / heads), SwiGLU (3 x d x ffn), two RMSNorms per layer;
    the embedding, the final norm and the LM head."""
    per_layer = 2 * d * d + 3 * d * 2 * d + 2 * d // heads + 3 * d * ffn + 2 * d
    return layers * per_layer + 2 * vocab * d + d


def test_fla_flops_come_from_fla_shape_not_our_preset():
    n = fla_1p3b_params()
    got = fla_flops_per_token(fla_config(), n, 8192)
    linear = n - 32000 * 2048  # the input embedding left out, the LM head kept
    mixer = 2 * (64 + 1) / 2 * (2048 + 4096) + 4 * 2048 * 4096 / 8  # chunk 64, key d, value 2d, 8 heads
    assert got == {"six_n": 6.0 * linear, "model": pytest.approx(6.0 * linear + 3 * 24 * mixer)}
    ours = flops_per_token(load_preset("1.3b"), 8192)
    assert got["six_n"] / ours["six_n"] == pytest.approx(1.0098, abs=1e-4)  # SwiGLU 3 x d x 2816 > 2 x d x 4096


def test_tied_fla_head_counts_the_embedding_once_as_the_head():
    n = fla_1p3b_params() - 32000 * 2048  # a tied head: one V x d matrix
    assert fla_flops_per_token(fla_config(tied=True), n, 8192)["six_n"] == 6.0 * n


class FlaStandIn(nn.Module):
    """A model of fla's calling convention (HF: labels shifted inside, .loss) and config fields."""

    def __init__(self, vocab=256, d=32):
        super().__init__()
        self.config = fla_config(d=d, layers=2, heads=2, vocab=vocab)
        self.embeddings = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d, bias=False)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids, labels):
        logits = self.lm_head(self.mix(self.embeddings(input_ids)))
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return SimpleNamespace(loss=loss)


class PlainEngine:
    """DeepSpeed's engine interface over a module: forward, backward, step, teardown."""

    def __init__(self, model):
        self.module = model

    def __call__(self, *a, **kw):
        return self.module(*a, **kw)

    def backward(self, loss):
        loss.backward()

    def step(self):
        pass

    def destroy(self):
        pass


def measure_fla(monkeypatch, **change) -> dict:
    """measure's row of the stand-in as the fla model, on CPU, with a peak of 1 FLOP/s."""
    monkeypatch.setattr(throughput_measure, "make_engine", lambda model, *a, **kw: PlainEngine(model))
    monkeypatch.setattr(throughput_measure, "device_peak_flops", lambda device, override: 1.0)
    args = SimpleNamespace(
        preset="tiny", seq_len=64, micro_batch=2, grad_accum=1, steps=2, warmup=0, doc_len=0, zero_stage=0,
        activation_checkpointing="none", compile=False, compile_mode=None, activation_memory_budget=1.0,
        ds_json=None, profile=False, profile_trace=None,
    )  # fmt: skip
    preset = load_preset("tiny", vocab_size=256)  # not the model measured: 4 layers, d 128
    return throughput_measure.measure(
        "fla", FlaStandIn, preset, SimpleNamespace(**{**vars(args), **change}), torch.device("cpu")
    )


def test_fla_row_mfu_counts_fla_models_flops(monkeypatch):
    row = measure_fla(monkeypatch)
    want = fla_flops_per_token(FlaStandIn().config, row["params"], 64)
    assert row["params"] == 2 * 256 * 32 + 32 * 32
    # a peak of 1 FLOP/s: mfu = tokens/s x FLOPs per token
    assert row["mfu_6n"] / row["tokens_per_s"] == pytest.approx(want["six_n"], rel=1e-3)
    assert row["mfu_model"] / row["mfu_6n"] == pytest.approx(want["model"] / want["six_n"], rel=1e-6)


def test_fla_row_says_it_ran_uncompiled(monkeypatch):
    """--compile compiles our models' blocks; fla's model runs as fla builds it, and its row says so."""
    row = measure_fla(
        monkeypatch, compile=True, compile_mode="max-autotune-no-cudagraphs", activation_memory_budget=0.8
    )
    assert (row["compile"], row["compile_mode"], row["activation_memory_budget"]) == (False, None, 1.0)
