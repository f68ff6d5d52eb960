"""Rank 0's start banner: how the batch is laid out over the ranks, the run's size and its precision,
then a warning line for each setting that runs but defeats itself."""

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
    banner = (
        f"{ranks} | micro-batch {cfg.train.micro_batch_size} x seq {cfg.data.seq_len} | accumulation "
        f"{accum} | {tokens_per_step:,} tokens/step | {tokens_per_step * cfg.train.max_steps:,} "
        f"tokens total | {params:,} parameters | ZeRO {cfg.deepspeed.zero_stage} "
        f"{cfg.deepspeed.precision} | device {device_type}"
    )
    return "\n".join([banner, *start_warnings(cfg)])


def start_warnings(cfg: TrainConfig) -> list[str]:
    """Settings a run accepts (short test runs use them on purpose) that a user may not mean."""
    warmup, steps = cfg.optim.warmup_steps, cfg.train.max_steps
    if warmup <= steps:
        return []
    return [
        f"warning: optim.warmup_steps={warmup} > train.max_steps={steps}: the learning rate never reaches "
        f"optim.lr; the last step updates with {steps / warmup:.3g} x optim.lr and nothing decays"
    ]
