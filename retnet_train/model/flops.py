"""Training FLOPs per token (forward + backward = 3x forward) for MFU.

six_n: the usual 6 N, N = parameters without the input embedding plus the LM-head matmul.
model: six_n plus the sequence mixer's own matmuls in the form that runs, counting only the causal
(useful) half:
  Transformer: per layer 4 d T_eff (QK^T and AV), T_eff = (T + 1) / 2 keys per query.
  RetNet, chunkwise with chunk C: per layer 2 C_eff (d_k + d_v) inside chunks, C_eff = (min(C, T) + 1) / 2,
  plus 4 d_k d_v / H for reading and updating the per-head K x V state (ours: d_k = d). C is the chunk
  that runs (kernels.chunk_that_runs): model.chunk_size; mode=parallel one chunk of the whole
  sequence (on the triton backend at most 256); fla's own chunk on the fla backend.
  RetNet, mode=recurrent (token by token): the state's read and update alone, 4 d_k d_v / H.
  RetNet under context parallelism (P ranks per sequence): the form each rank runs on its T / P tokens,
  on the torch path where the backend is triton (its kernels give the state passed on no gradient).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..kernels import chunk_that_runs, resolve_backend
from .config import RetNetConfig, TransformerConfig


def _linear_params(config) -> int:
    from . import build_model  # local: build on the meta device, no memory

    with torch.device("meta"):
        model = build_model(config)
    return model.num_params(exclude_embeddings=True) + (
        config.vocab_size * config.d_model if config.tie_embeddings else 0
    )


def retention_flops(key_dim: int, value_dim: int, n_heads: int, chunk_size: int, seq_len: int) -> float:
    """Forward FLOPs per token of one chunkwise retention layer's own matmuls (module docstring)."""
    c_eff = (min(chunk_size, seq_len) + 1) / 2
    return 2 * c_eff * (key_dim + value_dim) + 4 * key_dim * value_dim / n_heads


def training_flops(linear_params: int, n_layers: int, mixer: float) -> dict:
    """six_n and model FLOPs per token from the matmul parameters and one layer's mixer forward FLOPs."""
    six_n = 6 * linear_params
    return {"six_n": float(six_n), "model": float(six_n + 3 * n_layers * mixer)}


def retnet_mixer_flops(config: RetNetConfig, seq_len: int, backend: str, context_parallel: int = 1) -> float:
    """Forward FLOPs per token of one retention layer in the form config.mode runs on `backend`, on
    seq_len / context_parallel tokens per rank."""
    d, value_dim, heads = config.d_model, config.value_dim, config.n_heads
    if context_parallel > 1:  # retention_op sends a state that needs a gradient to the torch path
        seq_len, backend = seq_len // context_parallel, "torch" if backend == "triton" else backend
    if config.mode == "recurrent":
        return 4 * d * value_dim / heads
    chunk = chunk_that_runs(backend, config.mode, config.chunk_size, seq_len)
    return retention_flops(d, value_dim, heads, chunk, seq_len)


def retention_backend_that_runs(config: RetNetConfig, device: Optional[torch.device]) -> str:
    """config.retention_backend as the model resolves it on `device`; without a device, `auto` is the
    torch backend (what it runs on CPU)."""
    if device is not None:
        return resolve_backend(config.retention_backend, device, config.key_head_dim)
    return "torch" if config.retention_backend == "auto" else config.retention_backend


def flops_per_token(config, seq_len: int, device: Optional[torch.device] = None, context_parallel: int = 1) -> dict:
    """six_n and model FLOPs per token of training on sequences of seq_len tokens; `device`: where the
    model runs, which picks RetNet's retention backend (and so its chunk) for `auto`; context_parallel:
    the ranks that share each sequence (parallel.context_parallel_size)."""
    d = config.d_model
    if isinstance(config, RetNetConfig):
        backend = retention_backend_that_runs(config, device)
        mixer = retnet_mixer_flops(config, seq_len, backend, context_parallel)
    elif isinstance(config, TransformerConfig):
        mixer = 4 * d * (seq_len + 1) / 2
    else:
        raise TypeError(f"flops_per_token: unsupported config {type(config).__name__}")
    return training_flops(_linear_params(config), config.n_layers, mixer)
