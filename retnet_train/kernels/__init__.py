"""Retention backends. `torch` (plain, any device) and `fla` (fla-core's Triton kernels on
CUDA/ROCm) compute the same thing and share one state format, so a prefill on one can be
continued on the other.

Layout: q, k [B, T, H, K] (k already scaled by K^-1/2 and both rotated), v [B, T, H, V].
Returns o [B, T, H, V] (unnormalized), row sums s [B, T, H] of the decayed scores when asked
(for the paper's normalization; no gradient), and the state [B, H, K, V (+1 when row sums)].
"""
from __future__ import annotations

import functools

import torch

from .torch_retention import retention as torch_retention


@functools.lru_cache(maxsize=None)
def fla_available() -> bool:
    try:
        import fla.ops.retention  # noqa: F401
    except Exception:  # ImportError, or a Triton that cannot initialize on this machine
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "torch":
        return "torch"
    on_gpu = device.type == "cuda"  # ROCm builds of torch report "cuda" too
    if backend == "fla":
        if not on_gpu:
            raise ValueError("model.retention_backend=fla needs a CUDA or ROCm device; use 'auto' or 'torch' on CPU")
        if not fla_available():
            raise ValueError("model.retention_backend=fla needs fla-core: pip install 'retnet-train[gpu]'")
        return "fla"
    return "fla" if on_gpu and fla_available() else "torch"


def retention_op(backend, q, k, v, log_gamma, mode, chunk_size, reset=None, state=None, row_sums=True):
    if backend == "fla" and not (reset is not None and state is not None):
        from .fla_backend import fla_retention

        return fla_retention(q, k, v, log_gamma, mode, chunk_size, reset, state, row_sums)
    return _torch_op(q, k, v, log_gamma, mode, chunk_size, reset, state, row_sums)


def _torch_op(q, k, v, log_gamma, mode, chunk_size, reset, state, row_sums):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # -> [B, H, T, D]
    V = v.shape[-1]
    extra = 0
    if row_sums:
        # A column of ones makes retention also return the score row sums (and the state their
        # running sum) exactly. Zero columns pad the width to a multiple of 8, which keeps the
        # GEMMs on aligned tensor-core tiles (V + 1 = 513 would not be).
        extra = -(V + 1) % 8 + 1
        ones = v.new_zeros(v.shape[:-1] + (extra,))
        ones[..., 0] = 1
        v = torch.cat([v, ones], dim=-1)
        if state is not None:
            state = torch.nn.functional.pad(state, (0, extra - 1))
    if state is not None:
        state = state.to(q.dtype)
    o, state = torch_retention(q, k, v, log_gamma, mode, chunk_size, reset, state)
    o = o.transpose(1, 2)
    if row_sums:
        return o[..., :V], o[..., V].detach(), state[..., :V + 1]
    return o, None, state
