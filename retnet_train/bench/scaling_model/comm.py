"""Bytes each GPU sends per optimizer step under each ZeRO stage, and their time."""

from __future__ import annotations

from .settings import BF16, FP32


def collective_bus_bytes(kind: str, payload: float, n_gpus: int) -> float:
    """Bytes each GPU sends (= receives) in a ring collective over n_gpus: all-reduce 2 (n-1)/n S,
    reduce-scatter and all-gather (n-1)/n S; p2p S."""
    if kind == "p2p":
        return payload
    if n_gpus <= 1:
        return 0.0
    share = (n_gpus - 1) / n_gpus
    if kind == "all_reduce":
        return 2 * share * payload
    if kind in ("reduce_scatter", "all_gather"):
        return share * payload
    raise ValueError(f"collective {kind!r}")


def comm_ops(stage: int, n_params: int, grad_accum: int, overlap_comm: bool = True) -> list:
    """Collectives of one optimizer step over the data-parallel group (bf16 payloads):
    (name, collective, payload bytes, times per step, phase it can hide behind).

    ZeRO 1/2 reduce each gradient bucket with an all-reduce, each rank keeping its own slice, not a
    reduce-scatter: DeepSpeed's use_multi_rank_bucket_allreduce (default true; stage_1_and_2.py
    average_tensor), which the trainer's config leaves as is.
    ZeRO-0: gradient all-reduce after the last backward (DeepSpeed's engine, not overlapped).
    ZeRO-1: gradients all-reduced once per step (during the last micro-batch's backward with
      overlap_comm), updated weights all-gathered after the step: 1.5x ZeRO-0's bytes.
    ZeRO-2: gradients all-reduced every micro-batch (only the partition is kept), weights
      all-gathered after the step.
    ZeRO-3: every micro-batch gathers the weights for the forward and again for the backward and
      reduce-scatters the gradients (stage3.py reduce_scatter_coalesced): 3x the weights per
      micro-batch, no gather after the step.
    Without overlap_comm every collective runs on the compute stream (ZeRO-1's all-reduce after the
    backward; ZeRO-3's gathers too: parameter_offload.py) and hides behind nothing.
    """
    ops = _zero_ops(stage, BF16 * n_params, grad_accum)
    if overlap_comm:
        return ops
    return [(name, kind, payload, times, "none") for name, kind, payload, times, _ in ops]


def _zero_ops(stage: int, P2: float, grad_accum: int) -> list:
    """comm_ops' collectives with overlap_comm."""
    if stage == 0:
        return [("grad all-reduce", "all_reduce", P2, 1, "none")]
    if stage == 1:
        return [
            ("grad all-reduce", "all_reduce", P2, 1, "backward_last"),
            ("param all-gather", "all_gather", P2, 1, "none"),
        ]
    if stage == 2:
        return [
            ("grad all-reduce", "all_reduce", P2, grad_accum, "backward"),
            ("param all-gather", "all_gather", P2, 1, "none"),
        ]
    if stage == 3:
        return [
            ("param all-gather (forward)", "all_gather", P2, grad_accum, "forward"),
            ("param all-gather (backward)", "all_gather", P2, grad_accum, "backward"),
            ("grad reduce-scatter", "reduce_scatter", P2, grad_accum, "backward"),
        ]
    raise ValueError(f"zero stage {stage} is not one of 0, 1, 2, 3")


def context_parallel_state_bytes(cfg, micro_batch: int) -> float:
    """One rank's final recurrent state per layer: [B, H, K, V (+1 row-sum column)] fp32."""
    extra = 1 if cfg.normalize_retention else 0
    return FP32 * micro_batch * cfg.n_heads * cfg.key_head_dim * (cfg.value_head_dim + extra)


def context_parallel_ops(cfg, micro_batch: int, context_parallel: int, checkpointing: str = "none") -> list:
    """Collectives of one micro-batch over a context-parallel group of P ranks (parallel/context.py):
    (name, collective, payload bytes, times per micro-batch). Every layer all-gathers the P ranks'
    states (payload P x the state) and its backward all-reduces the gathered gradient (the same
    payload); activation checkpointing (selective or full) recomputes the forward, the all-gather too."""
    gathered = context_parallel * context_parallel_state_bytes(cfg, micro_batch)
    gathers = 1 if checkpointing == "none" else 2
    return [
        ("context-parallel all-gather", "all_gather", gathered, gathers * cfg.n_layers),
        ("context-parallel all-reduce", "all_reduce", gathered, cfg.n_layers),
    ]
