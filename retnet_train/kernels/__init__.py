"""Retention backends. `torch` (plain, any device), `fla` (fla-core's Triton kernels on
CUDA/ROCm) and `triton` (our own Triton kernels, triton_retention.py, CUDA/ROCm) compute the same
thing and share one state format, so a prefill on one can be continued on the other.

Layout: q, k [B, T, H, K] (k already scaled by K^-1/2 and both rotated), v [B, T, H, V].
Returns o [B, T, H, V] (unnormalized), row sums s [B, T, H] of the decayed scores when asked
(for the paper's normalization; no gradient), and the state [B, H, K, V (+1 when row sums)], fp32
for bf16/fp16 inputs in every backend and form.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from .torch_retention import chunkwise_retention, parallel_retention, recurrent_retention


@functools.lru_cache(maxsize=None)
def fla_available() -> bool:
    try:
        import fla.ops.retention  # noqa: F401
    except Exception:  # ImportError, or a Triton that cannot initialize on this machine
        return False
    return True


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton.language  # noqa: F401 (a triton that cannot initialize fails here)
    except Exception:
        return False
    return True


# GPU backends: how to tell they can run, and what to install when they cannot.
GPU_BACKENDS = {
    "fla": (fla_available, "needs fla-core: pip install 'retnet-train[gpu]'"),
    "triton": (triton_available, "needs triton importable (it ships with CUDA/ROCm torch)"),
}


# The widest key head dim the Triton kernels' GPU tests cover (K256/V512 and K128/V256 pass on an H200).
GPU_CHECKED_TRITON_KEY_DIM = 256


def resolve_backend(backend: str, device: torch.device, key_dim: int = 0) -> str:
    """The backend that runs: an explicit GPU backend is checked; `auto` takes our Triton kernels on
    NVIDIA GPUs at the key head dims their GPU tests cover, else fla on a GPU where installed, else torch."""
    if backend == "torch":
        return "torch"
    on_gpu = device.type == "cuda"  # ROCm builds of torch report "cuda" too
    if backend in GPU_BACKENDS:
        available, missing = GPU_BACKENDS[backend]
        if not on_gpu:
            raise ValueError(
                f"model.retention_backend={backend} needs a CUDA or ROCm device; use 'auto' or 'torch' on CPU"
            )
        if not available():
            raise ValueError(f"model.retention_backend={backend} {missing}")
        return backend
    on_nvidia = on_gpu and torch.version.hip is None  # the Triton kernels' GPU tests ran on NVIDIA only
    if on_nvidia and key_dim <= GPU_CHECKED_TRITON_KEY_DIM and triton_available():
        return "triton"
    return "fla" if on_gpu and fla_available() else "torch"


def triton_refusal(config, context_parallel: bool) -> Optional[str]:
    """Why model.retention_backend=triton cannot train `config` (a RetNetConfig; None: it can), for the config
    checks at start. retention_op refuses key head dims above GPU_CHECKED_TRITON_KEY_DIM on a GPU where it
    sends a forward to the Triton kernels; the recurrent form and context parallelism (a state with a
    gradient) go to the torch form there, and run."""
    K = config.key_head_dim
    if config.retention_backend != "triton" or config.mode == "recurrent" or context_parallel:
        return None
    if K <= GPU_CHECKED_TRITON_KEY_DIM:
        return None
    return (
        f"model.retention_backend=triton: key head dim {K} (model.d_model={config.d_model} / "
        f"model.n_heads={config.n_heads}) is wider than the Triton kernels run (their GPU tests cover up to "
        f"{GPU_CHECKED_TRITON_KEY_DIM}); model.retention_backend=auto or torch run it"
    )


FLA_CHUNK = 64  # fla's chunk_retention runs chunk_simple_gla at its own chunk size, whatever is asked


def chunk_that_runs(backend: str, mode: str, chunk_size: int, seq_len: int) -> int:
    """The chunk of the chunkwise form that computes a forward of `seq_len` tokens in `mode` (parallel or
    chunkwise) on `backend` (resolved: torch, triton or fla), as retention_op dispatches it. The parallel
    form is one chunk of the whole sequence: on the triton backend rounded up to a multiple of 64 but at
    most 256, the same retention in the chunkwise form; fla runs its own chunk in both modes."""
    if backend == "fla":
        return FLA_CHUNK
    if mode == "parallel":
        return min(-(-seq_len // 64) * 64, 256) if backend == "triton" else seq_len
    return chunk_size


def retention_op(
    backend,
    q,
    k,
    v,
    log_gamma,
    mode,
    chunk_size,
    reset=None,
    state=None,
    row_sums=True,
    state_grad=False,
    recompute=True,
    keep_state=True,
):
    """state_grad: the final state is backpropagated through (context parallel); our Triton kernels
    give neither it nor an incoming state a gradient: the torch path runs for either. recompute (torch
    path): the backward recomputes the chunk states instead of keeping them
    (torch_retention._equal_full_chunks). keep_state (torch path): the caller uses the final state, so
    it is summed exactly in fp32; False (training) skips that pass (torch_retention's docstring)."""
    # Under autocast the rotation leaves q, k in fp32 beside a bf16 v; the backward of a custom autograd
    # op runs outside autocast, so the inputs share v's dtype from here on.
    q, k = q.to(v.dtype), k.to(v.dtype)
    state_grad = state_grad or (state is not None and state.requires_grad)
    if backend == "triton" and mode != "recurrent" and not state_grad:
        from .triton_retention import supported, triton_retention

        # Decoding (recurrent, one token at a time) and chunk sizes that are not a multiple of 16 run on
        # the torch path.
        C = chunk_that_runs("triton", mode, chunk_size, q.shape[1])
        if q.is_cuda and q.shape[-1] > GPU_CHECKED_TRITON_KEY_DIM:
            raise ValueError(
                f"model.retention_backend=triton: key head dim {q.shape[-1]} is wider than the GPU tests "
                f"cover (tests/kernels/test_triton_retention.py, up to {GPU_CHECKED_TRITON_KEY_DIM}); use "
                f"retention_backend=torch, or key dims <= {GPU_CHECKED_TRITON_KEY_DIM}"
            )
        if supported(C, q.shape[-1], v.shape[-1]):
            return triton_retention(q, k, v, log_gamma, C, state, row_sums, reset)
    if backend == "fla" and not (reset is not None and state is not None):
        from .fla_backend import fla_retention

        return fla_retention(q, k, v, log_gamma, mode, chunk_size, reset, state, row_sums)
    return _torch_op(q, k, v, log_gamma, mode, chunk_size, reset, state, row_sums, recompute, keep_state)


def _torch_op(q, k, v, log_gamma, mode, chunk_size, reset, state, row_sums, recompute=True, keep_state=True):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # -> [B, H, T, D]
    if mode != "recurrent":
        # the state as it is (fp32 from a bf16 prefill): the forms round it to q's dtype only where it
        # meets q's GEMMs, and return the final state in fp32 at least
        out = (
            parallel_retention(q, k, v, log_gamma, reset, state, row_sums, recompute, keep_state)
            if mode == "parallel"
            else chunkwise_retention(q, k, v, log_gamma, chunk_size, reset, state, row_sums, recompute, keep_state)
        )
        return out[0].transpose(1, 2), (out[2].transpose(1, 2) if row_sums else None), out[1]
    if not row_sums:
        o, state = recurrent_retention(q, k, v, log_gamma, reset, state)
        return o.transpose(1, 2), None, state
    # Token by token (decoding): a column of ones makes the recurrence carry the row sums too.
    V = v.shape[-1]
    v = torch.cat([v, v.new_ones(v.shape[:-1] + (1,))], dim=-1)
    o, state = recurrent_retention(q, k, v, log_gamma, reset, state)
    o = o.transpose(1, 2)
    return o[..., :V], o[..., V].detach(), state
