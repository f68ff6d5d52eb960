"""AdamW with weight-decay groups, the LR schedule, the DeepSpeed config built from ours and the engine."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .config import FP32_WEIGHTS, TrainConfig
from .faults import OOM_HINT, TrainingError


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay_embeddings: bool) -> list:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or (no_decay_embeddings and "embed_tokens" in name)  # norms, biases, embeddings
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(
    step: int, warmup: int, total: int, decay: str, min_ratio: float, decay_fraction: Optional[float] = None
) -> float:
    """Multiplier of the peak lr after `step` optimizer steps: linear warm-up, then decay (linear, cosine
    or 1 - sqrt) to min_ratio at step `total`. The decay starts when warm-up ends or, with decay_fraction
    (warmup-stable-decay), holds the peak until the last round(decay_fraction x total) steps, at least
    one, never before warm-up ends."""
    if step < warmup:
        return (step + 1) / warmup
    start = warmup if decay_fraction is None else max(warmup, total - max(1, round(decay_fraction * total)))
    if decay == "constant" or total <= warmup or step < start:
        return 1.0
    progress = min(1.0, (step - start) / max(1, total - start))
    if decay == "linear":
        shape = 1 - progress
    elif decay == "sqrt":
        shape = 1 - math.sqrt(progress)
    else:
        shape = 0.5 * (1 + math.cos(math.pi * progress))
    return min_ratio + (1 - min_ratio) * shape


def lr_schedule(cfg: TrainConfig) -> Callable[[int], float]:
    """The LambdaLR function of optim.* and train.max_steps."""
    o = cfg.optim
    return lambda s: lr_lambda(s, o.warmup_steps, cfg.train.max_steps, o.decay, o.min_lr_ratio, o.decay_fraction)


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that clips gradients itself, records their norm, and leaves weights and moments
    untouched when the norm is non-finite. DeepSpeed does all three for bf16/fp16 and ZeRO >= 1
    but not for fp32 ZeRO-0, where this class is used."""

    def __init__(self, params, max_norm: float, **kwargs):
        super().__init__(params, **kwargs)
        self.max_norm = max_norm
        self.last_grad_norm = None
        # DeepSpeed's engine reads these after step(): `overflow` marks the step as not applied
        # (engine.was_step_applied(), skipped_steps, no LR-scheduler step), as its own optimizers do.
        self.overflow = False
        self._global_grad_norm = None

    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_norm if self.max_norm > 0 else float("inf"))
        self.last_grad_norm = self._global_grad_norm = float(norm)
        self.overflow = not torch.isfinite(norm).item()
        if self.overflow:
            return None  # skipped: no update
        return super().step(closure)


def skip_duplicate_overflow_check(engine) -> bool:
    """Drop DeepSpeed's per-gradient inf/NaN test where its gradient-norm test already decides.

    Under bf16 ZeRO-1/2 DeepSpeed first tests every gradient (~7 launches per parameter tensor and a
    host sync: ~1,500 launches at 1.3B, host-bound), then computes the global norm, which is
    non-finite whenever a gradient is, and skips the step on either. Under fp32 it already relies on
    the norm alone (the non-finite trainer test covers that path). Only with the norm computed
    (clipping on) and no CPU offload (whose check runs during backward). True if it was dropped."""
    try:
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    except ImportError:
        return False
    opt = engine.optimizer
    if not (
        isinstance(opt, DeepSpeedZeroOptimizer)
        and opt.dtype == torch.bfloat16
        and opt.check_grad_overflow
        and opt.compute_grad_norm
        and engine.gradient_clipping() > 0
        and not opt.cpu_offload
    ):
        return False
    opt.has_overflow = lambda partition_gradients=True: False  # the norm test (kept) skips the step
    return True


def undo_state_init_step(engine) -> bool:
    """Take back the AdamW step DeepSpeed's fp16/bf16 optimizer without ZeRO (FP16_UnfusedOptimizer)
    takes on zero gradients to create Adam's state: it counts as Adam's step 1, so bias correction
    shrinks the first real updates (~0.74 x with betas 0.9, 0.98), and it applies weight decay once to
    the fp32 master weights. True if it was undone. torch's AdamW creates its state at the first step."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if not isinstance(engine.optimizer, FP16_UnfusedOptimizer):
        return False
    engine.optimizer.optimizer.state.clear()
    engine.optimizer.refresh_fp32_params()  # the masters as the model's weights, without the decay
    return True


def unscale_unfused_grad_norm(optimizer) -> bool:
    """FP16_UnfusedOptimizer (fp16 at ZeRO-0) records the norm of the loss-scaled gradients as the
    step's gradient norm, where DeepSpeed's other optimizers divide by the scale: wrap its step so the
    norm is divided by the scale the step's gradients were taken with (the step may then raise it).
    True if wrapped."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if not isinstance(optimizer, FP16_UnfusedOptimizer):
        return False
    # the scale backward() multiplies the loss by: in loss_scale_config from DeepSpeed 0.18.6 (which does
    # not scale bf16), on the optimizer itself before
    scaling = getattr(optimizer, "loss_scale_config", optimizer)
    if not getattr(scaling, "use_grad_scaling", True):
        return False
    scaled_step = optimizer.step

    def step(closure=None):
        scale = scaling.cur_scale
        overflow = scaled_step(closure)
        if not optimizer.overflow:
            optimizer._global_grad_norm = optimizer._global_grad_norm / scale
        return overflow

    optimizer.step = step
    return True


def block_classes() -> list:
    """Our decoder blocks, as DeepSpeed names classes (module.qualname)."""
    from ..model.retnet import RetNetBlock
    from ..model.transformer import TransformerBlock

    return [f"{c.__module__}.{c.__qualname__}" for c in (RetNetBlock, TransformerBlock)]


def uses_guarded_adamw(cfg: TrainConfig) -> bool:
    ds = cfg.deepspeed
    return ds.zero_stage == 0 and ds.precision in FP32_WEIGHTS and not ds.offload_optimizer


def build_optimizer(model, cfg: TrainConfig, device: torch.device):
    o = cfg.optim
    groups = param_groups(model, o.weight_decay, o.no_decay_embeddings)
    fused = device.type == "cuda" and not cfg.deepspeed.offload_optimizer
    if cfg.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, adamw_mode=True)
    elif uses_guarded_adamw(cfg):
        optimizer = GuardedAdamW(groups, o.grad_clip, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=fused or None)
    else:
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg))
    return optimizer, scheduler


def overlaps_comm(overlap_comm: bool, world_size: int) -> bool:
    """Whether DeepSpeed overlaps the gradient reduction with the backward pass: only where there is
    one. On one rank it would cost a second reduction stream's synchronisation and a second bucket
    (5e8 bf16 elements) for nothing. Also the scaling model's rule."""
    return overlap_comm and world_size > 1


def deepspeed_config(cfg: TrainConfig, grad_accum: int, world_size: int, load_universal: bool = False) -> dict:
    """The whole DeepSpeed config, derived from the Hydra config (no second JSON to keep in sync).

    world_size: all ranks, context-parallel ones included: DeepSpeed reduces gradients over all.

    load_universal: the checkpoint to resume was converted to DeepSpeed's universal format
    (another world size or ZeRO stage; components/reshard.py)."""
    ds = cfg.deepspeed
    config = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": 0.0 if uses_guarded_adamw(cfg) else cfg.optim.grad_clip,  # GuardedAdamW clips
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": zero_config(ds, world_size),
        "steps_per_print": 10**12,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    config.update(precision_options(ds))
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    return config


def zero_config(ds, world_size: int) -> dict:
    """deepspeed.* as DeepSpeed's zero_optimization section."""
    zero = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(
            reduce_bucket_size=ds.reduce_bucket_size,
            allgather_bucket_size=ds.allgather_bucket_size,
            contiguous_gradients=ds.contiguous_gradients,
            overlap_comm=overlaps_comm(ds.overlap_comm, world_size),
        )
    if ds.zero_stage == 3:
        zero.pop("allgather_bucket_size")
        zero.update(zero3_options(ds))
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return zero


def zero3_options(ds) -> dict:
    return {
        "stage3_prefetch_bucket_size": ds.allgather_bucket_size,
        # Gather each block's parameters at once when it runs ("leaf" modules, FSDP's per-block
        # unit), not per Linear and norm: per-submodule hooks would sit inside the compiled blocks,
        # break the graph at every submodule, and past Dynamo's recompile limit leave the later
        # layers uncompiled.
        "leaf_module": {"classes": block_classes()},
        # DeepSpeed's own Linear (patched into F.linear for the whole process) reads each weight's
        # ds_id, which Dynamo (torch 2.11) guards on: every layer would recompile its block until the
        # recompile limit leaves later layers uncompiled. DeepSpeed turns it off under its own
        # compile too; it only saves memory under autocast, which the trainer does not use.
        "memory_efficient_linear": False,
    }


def precision_options(ds) -> dict:
    """The config's autocast, gradient-accumulation dtype and communication dtype keys, where set."""
    out = {}
    if ds.precision == "bf16-mixed":
        # fp32 weights and gradients, the forward under torch.autocast(bf16) as in a plain AMP loop. No
        # module is "lower precision safe": gradients are reduced in fp32, as DDP reduces an AMP loop's.
        out["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    if ds.grad_accum_dtype is not None:
        out["data_types"] = {"grad_accum_dtype": ds.grad_accum_dtype}
    if ds.grad_accum_dtype == "fp32":
        # BF16_Optimizer all-reduces its fp32 sum after the last backward in this dtype, by default the
        # weights' (bf16): a round trip that would round the sum to bf16 even on one rank
        out["communication_data_type"] = "fp32"
    return out


def global_grad_norm(engine) -> Optional[float]:
    """The engine's gradient norm of its last step as logged: None where it has none or it is not
    finite (a skipped step)."""
    norm = engine.get_global_grad_norm()
    return None if norm is None or not math.isfinite(float(norm)) else float(norm)


def build_engine(model, cfg: TrainConfig, grad_accum: int, world_size: int, device: torch.device, load_universal: bool):
    """(DeepSpeed engine, LR scheduler) over `model` with our optimizer and schedule (deepspeed_config
    says what load_universal is); running out of memory here says which settings to change."""
    import deepspeed

    try:
        optimizer, scheduler = build_optimizer(model, cfg, device)
        config = deepspeed_config(cfg, grad_accum, world_size, load_universal=load_universal)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
        skip_duplicate_overflow_check(engine)
        undo_state_init_step(engine)
        unscale_unfused_grad_norm(engine.optimizer)
    except torch.cuda.OutOfMemoryError as e:
        raise TrainingError(f"{OOM_HINT}\n{e}") from e
    return engine, scheduler
