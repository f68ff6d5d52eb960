"""Rank 0's start banner: how the batch is laid out over the ranks, the run's size and its precision,
then a warning line for each setting that runs but defeats itself."""

from __future__ import annotations

from .config import TrainConfig


def start_banner(
    cfg: TrainConfig,
    world: int,
    dp_world: int,
    accum: int,
    tokens_per_step: int,
    params: int,
    device_type: str,
    resumed_at: tuple[int, int] = (0, 0),
) -> str:
    """dp_world: the data-parallel ranks (fewer than `world` under context parallel); accum: micro-batches
    per optimizer step; params: the model's parameter count; resumed_at: (step, tokens seen) of the
    checkpoint resumed, whose steps may have had another batch size."""
    step, tokens_seen = resumed_at
    total = tokens_seen + tokens_per_step * max(0, cfg.train.max_steps - step)
    ranks = (
        f"world {world} ({dp_world} data x {world // dp_world} context parallel)"
        if dp_world != world
        else f"world {world}"
    )
    banner = (
        f"{ranks} | micro-batch {cfg.train.micro_batch_size} x seq {cfg.data.seq_len} | accumulation "
        f"{accum} | {tokens_per_step:,} tokens/step | {total:,} "
        f"tokens total | {params:,} parameters | ZeRO {cfg.deepspeed.zero_stage} "
        f"{cfg.deepspeed.precision} | device {device_type}"
    )
    return "\n".join([banner, *start_warnings(cfg), *cpu_warnings(accum, tokens_per_step, device_type)])


def start_warnings(cfg: TrainConfig) -> list[str]:
    """Settings a run accepts (short test runs use them on purpose) that a user may not mean."""
    warmup, steps = cfg.optim.warmup_steps, cfg.train.max_steps
    if warmup <= steps:
        return []
    return [
        f"warning: optim.warmup_steps={warmup} > train.max_steps={steps}: the learning rate never reaches "
        f"optim.lr; the last step updates with {steps / warmup:.3g} x optim.lr and nothing decays"
    ]


CPU_STEP_TOKENS = 1 << 18  # ~a minute of a tiny model on CPU; the schema's 4M-token batch takes hours


def cpu_warnings(accum: int, tokens_per_step: int, device_type: str) -> list[str]:
    """A CPU run with a GPU-sized batch (the schema's defaults without an experiment) runs steps of hours,
    and a stop signal waits for the step's end."""
    if device_type != "cpu" or tokens_per_step <= CPU_STEP_TOKENS:
        return []
    return [
        f"warning: {tokens_per_step:,} tokens per optimizer step ({accum:,} micro-batches) on CPU: a step takes "
        "hours, and SIGTERM / SIGUSR1 stop the run only at a step's end; set train.global_batch_tokens "
        "(experiment=tiny_cpu: 2,048)"
    ]
