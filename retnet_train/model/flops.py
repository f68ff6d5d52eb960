"""Training FLOPs per token (forward + backward = 3x forward) for MFU.

six_n: the usual 6 N, N = parameters without the input embedding plus the LM-head matmul.
model: six_n plus the sequence mixer's own matmuls, counting only the causal (useful) half:
  Transformer: per layer 4 d T_eff (QK^T and AV), T_eff = (T + 1) / 2 keys per query.
  RetNet (chunkwise, chunk C): per layer 2 C_eff (d + d_v) inside chunks, C_eff = (C + 1) / 2,
  plus 4 d d_v / H for reading and updating the per-head K x V state.
"""

from __future__ import annotations

import torch

from .config import RetNetConfig, TransformerConfig


def _linear_params(config) -> int:
    from . import build_model  # local: build on the meta device, no memory

    with torch.device("meta"):
        model = build_model(config)
    return model.num_params(exclude_embeddings=True) + (
        config.vocab_size * config.d_model if config.tie_embeddings else 0
    )


def flops_per_token(config, seq_len: int) -> dict:
    six_n = 6 * _linear_params(config)
    d, L = config.d_model, config.n_layers
    if isinstance(config, RetNetConfig):
        c_eff = (min(config.chunk_size, seq_len) + 1) / 2
        mixer = 2 * c_eff * (d + config.value_dim) + 4 * d * config.value_dim / config.n_heads
    elif isinstance(config, TransformerConfig):
        mixer = 4 * d * (seq_len + 1) / 2
    else:
        raise TypeError(f"flops_per_token: unsupported config {type(config).__name__}")
    return {"six_n": float(six_n), "model": float(six_n + 3 * L * mixer)}
