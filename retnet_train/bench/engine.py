"""The benchmarks' DeepSpeed engine: the trainer's config on one rank, one optimizer step, and its teardown."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from ..components.config import TrainConfig
from ..components.optim import deepspeed_config, skip_duplicate_overflow_check


def engine_config(micro_batch: int, zero_stage: int, grad_accum: int = 1, bf16: bool = True, overrides=None) -> dict:
    """The trainer's DeepSpeed config at its defaults (DeepSpeedConfig in components/config.py: buckets,
    contiguous gradients, whole-block gathering under ZeRO-3; one rank), clipping at 1.0,
    deep-merged with `overrides` (--ds-json)."""
    cfg = TrainConfig()
    cfg.train.micro_batch_size, cfg.deepspeed.zero_stage = micro_batch, zero_stage
    cfg.deepspeed.precision = "bf16" if bf16 else "fp32"
    config = deepspeed_config(cfg, grad_accum, world_size=1)  # the bench runs on one GPU
    config["gradient_clipping"] = 1.0  # the trainer's fp32 ZeRO-0 clips in its own optimizer instead
    return OmegaConf.to_container(OmegaConf.merge(config, overrides or {}))


def make_engine(model, micro_batch: int, zero_stage: int, grad_accum: int = 1, bf16: bool = True, ds_overrides=None):
    """The benchmarks' DeepSpeed engine: AdamW (fused on GPU) under engine_config."""
    import deepspeed

    fused = next(model.parameters()).is_cuda or None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), weight_decay=0.05, fused=fused)
    config = engine_config(micro_batch, zero_stage, grad_accum, bf16, ds_overrides)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    skip_duplicate_overflow_check(engine)  # as the trainer does
    return engine


def train_step(engine, batch, ours: bool, accum: int = 1, marks=None, timer=None, peaks=None):
    """One optimizer step over `accum` micro-batches; `timer` appends 4 marks to `marks` around the
    phases of the last micro-batch: forward | backward | optimizer step (DeepSpeed's, incl. its
    gradient copies and clipping), on a GPU timed without a host sync; `peaks` (PhasePeaks) takes the
    allocator's peak at the end of each phase of every micro-batch."""
    phase_ended = peaks.end if peaks is not None else lambda phase: None
    for i in range(accum):
        mark = marks is not None and i == accum - 1
        if mark:
            marks.append(timer.mark())
        # a new step for CUDA-graphed blocks (--compile-mode reduce-overhead): the previous micro-batch's
        # graph outputs may be overwritten (without it the next replay refuses to); a no-op otherwise
        torch.compiler.cudagraph_mark_step_begin()
        if ours:
            loss = engine(
                batch["input_ids"], labels=batch["labels"], doc_starts=batch.get("doc_starts"), return_logits=False
            ).loss
        else:  # HF convention: labels are shifted inside
            loss = engine(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        phase_ended("forward")
        if mark:
            marks.append(timer.mark())
        engine.backward(loss)
        phase_ended("backward")
        if mark:
            marks.append(timer.mark())
        engine.step()  # a no-op until the accumulation boundary
        phase_ended("step")
    if marks is not None:
        marks.append(timer.mark())
    return loss


def release(engine) -> None:
    """Free the engine's GPU memory so that the next model's peak is its own."""
    engine.destroy()  # DeepSpeed's own teardown (hooks, buffers)
    engine.optimizer = engine.lr_scheduler = engine.module = None
    torch._dynamo.reset()
