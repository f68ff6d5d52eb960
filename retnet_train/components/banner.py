"""Rank 0's start banner: how the batch is laid out over the ranks, the run's size and its precision."""

from __future__ import annotations

from .config import TrainConfig


def start_banner(
    cfg: TrainConfig, world: int, dp_world: int, accum: int, tokens_per_step: int, params: int, device_type: str
) -> str:
    """dp_world: the data-parallel ranks (fewer than `world` under context parallel); accum: micro-batches
    per optimizer step; params: the model's parameter count."""
    ranks = (
        f"world {world} ({dp_world} data x {world // dp_world} context parallel)"
        if dp_world != world
        else f"world {world}"
    )
    return (
        f"{ranks} | micro-batch {cfg.train.micro_batch_size} x seq {cfg.data.seq_len} | accumulation "
        f"{accum} | {tokens_per_step:,} tokens/step | {tokens_per_step * cfg.train.max_steps:,} "
        f"tokens total | {params:,} parameters | ZeRO {cfg.deepspeed.zero_stage} "
        f"{cfg.deepspeed.precision} | device {device_type}"
    )
