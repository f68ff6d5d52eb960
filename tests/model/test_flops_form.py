"""MFU's model FLOPs count retention in the form that runs: the chunk of model.chunk_size, the parallel form's
one chunk of the whole sequence (at most 256 on the triton backend), fla's own chunk of 64, or the recurrent
form's state read and update alone."""

import pytest
import torch

from retnet_train.model import RetNetConfig
from retnet_train.model.flops import flops_per_token

# d 64, value dim 128, 2 heads: the state's read and update are 4 x 64 x 128 / 2 = 16,384 FLOPs a token
SIZE = dict(vocab_size=1000, d_model=64, n_layers=2, n_heads=2, ffn_dim=128, chunk_size=16)
STATE = 16_384


def mixer(config: RetNetConfig, seq_len: int) -> float:
    """One layer's retention forward FLOPs per token, from the model FLOPs: 3 x n_layers x mixer over six_n."""
    f = flops_per_token(config, seq_len)
    return (f["model"] - f["six_n"]) / (3 * config.n_layers)


@pytest.mark.parametrize(
    "backend, mode, seq_len, chunk",
    [
        ("torch", "chunkwise", 1024, 16),
        ("triton", "chunkwise", 1024, 16),
        ("torch", "parallel", 1024, 1024),  # the whole sequence is one chunk
        ("triton", "parallel", 1024, 256),  # the triton kernels' parallel form: chunks of at most 256
        ("triton", "parallel", 100, 100),  # a chunk of 128 over 100 tokens: one chunk of the sequence
        ("fla", "chunkwise", 1024, 64),  # fla's own chunk, whatever model.chunk_size says
        ("fla", "parallel", 1024, 64),
    ],
)
def test_retention_is_counted_at_the_chunk_that_runs(backend, mode, seq_len, chunk):
    config = RetNetConfig(**SIZE, mode=mode, retention_backend=backend)
    # 2 C_eff (d_k + d_v) inside chunks, C_eff = (C + 1) / 2, plus the state's read and update
    assert mixer(config, seq_len) == pytest.approx((chunk + 1) * (64 + 128) + STATE)


def test_the_parallel_form_at_1024_counts_its_whole_causal_half():
    torch_parallel = RetNetConfig(**SIZE, mode="parallel", retention_backend="torch")
    assert mixer(torch_parallel, 1024) == 1025 * 192 + STATE == 213_184
    chunkwise = RetNetConfig(**SIZE, retention_backend="torch")
    assert mixer(chunkwise, 1024) == 17 * 192 + STATE == 19_648


def test_the_recurrent_form_counts_the_state_alone():
    assert mixer(RetNetConfig(**SIZE, mode="recurrent", retention_backend="torch"), 1024) == STATE


def test_auto_counts_the_backend_it_resolves_to_on_the_device():
    """On CPU `auto` runs the torch backend: the parallel form over the whole sequence."""
    config = RetNetConfig(**SIZE, mode="parallel")
    f = flops_per_token(config, 1024, torch.device("cpu"))
    assert (f["model"] - f["six_n"]) / 6 == 1025 * 192 + STATE


@pytest.mark.parametrize(
    "backend, mode, chunk_size, chunk",
    [
        ("torch", "parallel", 16, 512),  # each rank's 512 tokens are one chunk, not the sequence's 1024
        ("triton", "parallel", 16, 512),  # a state with a gradient runs on the torch path, not triton's 256
        ("triton", "chunkwise", 16, 16),
        ("torch", "chunkwise", 1024, 512),  # a chunk longer than a rank's tokens: one chunk of them
        ("fla", "chunkwise", 16, 64),  # fla runs under context parallel, at its own chunk
    ],
)
def test_context_parallel_counts_the_form_each_rank_runs(backend, mode, chunk_size, chunk):
    """Two ranks per sequence of 1024 tokens: each runs retention on its 512 (parallel/context.py)."""
    config = RetNetConfig(**{**SIZE, "chunk_size": chunk_size}, mode=mode, retention_backend=backend)
    f = flops_per_token(config, 1024, context_parallel=2)
    assert (f["model"] - f["six_n"]) / (3 * config.n_layers) == pytest.approx((chunk + 1) * (64 + 128) + STATE)
