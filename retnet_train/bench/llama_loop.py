"""The quality benchmark's reference: a stock Hugging Face LlamaForCausalLM of the Transformer++
preset's shape in a plain torch loop, around our loaders, optimizer groups, schedule and logging, so
that it differs from the trainer in the training code only (torch autocast for bf16 with fp32
weights, fused AdamW, gradient clipping)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ..components.validation import perplexity


def build_llama(cfg, device):
    """LlamaForCausalLM of the config's (Transformer++) model shape, with transformers' own init."""
    import transformers

    from ..interop.llama import llama_config
    from ..model import model_config_from_dict

    torch.manual_seed(cfg.train.seed)
    # attention through SDPA (the flash kernel on GPU), as our Transformer's
    config = transformers.LlamaConfig(
        **llama_config(model_config_from_dict(cfg.model), cfg.data.seq_len), attn_implementation="sdpa"
    )
    return transformers.LlamaForCausalLM(config).to(device)


def export_llama_init(cfg, directory: Path) -> Path:
    """The initial weights of the llama loop for this config (its seed), as our Transformer's export
    (bench.quality --paired-init)."""
    from ..inference.native import save_native
    from ..interop.llama import from_llama

    llama = build_llama(cfg, torch.device("cpu"))
    save_native(from_llama(llama.state_dict(), llama.config), str(directory))
    return directory


def make_optimizer(cfg, model, device):
    """AdamW over the trainer's parameter groups, and the trainer's learning-rate schedule."""
    from ..components.optim import lr_schedule, param_groups

    o = cfg.optim
    optimizer = torch.optim.AdamW(
        param_groups(model, o.weight_decay, o.no_decay_embeddings),
        lr=o.lr,
        betas=tuple(o.betas),
        eps=o.eps,
        fused=device.type == "cuda" or None,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg))
    return optimizer, schedule


def train_llama(cfg) -> int:
    """Train the Llama for cfg.train.max_steps, logging to cfg.run.dir/metrics.jsonl as the trainer
    does; returns its parameter count."""
    from ..components.config import grad_accumulation
    from ..components.distributed import pick_device
    from ..components.loaders import build_loaders
    from ..components.metrics import Throughput
    from ..components.validation import evaluation_due

    check_precision(cfg)
    device = pick_device(cfg.train.device, cfg.deepspeed.precision)
    accum = grad_accumulation(cfg, 1)
    model = build_llama(cfg, device)
    loss_of = make_loss_fn(cfg, model, device)
    optimizer, schedule = make_optimizer(cfg, model, device)
    loader, val_loader = build_loaders(cfg, model.config.vocab_size, 0, 1)  # the trainer's, one rank
    logger = open_logger(cfg)
    tokens_per_step = accum * cfg.train.micro_batch_size * cfg.data.seq_len
    throughput = Throughput(0)
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
    model.train()
    for step in range(1, cfg.train.max_steps + 1):
        lr = schedule.get_last_lr()[0]  # this step's rate (the trainer logs the same), before schedule.step()
        losses = accumulate_gradients(loss_of, loader, accum)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_seen = step * tokens_per_step
        last = step == cfg.train.max_steps
        if step % cfg.train.log_interval == 0 or last:
            logger.log(step_metrics(step, losses, lr, grad_norm, throughput, device, tokens_seen))
        if evaluation_due(step, cfg.train.eval_interval, cfg.train.max_steps):
            with throughput.paused():
                val = validation_loss(model, loss_of, val_loader)
            logger.log({"step": step, "val_loss": val, "val_ppl": perplexity(val)})
    logger.close()
    return sum(p.numel() for p in model.parameters())


def check_precision(cfg) -> None:
    if cfg.deepspeed.precision not in ("bf16", "bf16-mixed", "fp32"):
        raise ValueError(
            f"llama: deepspeed.precision={cfg.deepspeed.precision}: the plain loop runs fp32 or autocast bf16 "
            "(bf16, bf16-mixed)"
        )


def make_loss_fn(cfg, model, device):
    """loss_of(batch): the mean token cross-entropy of a micro-batch, the forward compiled if the config
    says so and under bf16 autocast unless the precision is fp32."""
    step_fn = torch.compile(model) if cfg.train.compile else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.deepspeed.precision != "fp32")

    def loss_of(batch):
        with autocast:
            logits = step_fn(input_ids=batch["input_ids"].to(device)).logits
        return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].to(device).flatten(), ignore_index=-100)

    return loss_of


def open_logger(cfg):
    """The trainer's metrics logger in cfg.run.dir (created), with the resolved config."""
    from omegaconf import OmegaConf

    from ..components.metrics import MetricsLogger

    os.makedirs(cfg.run.dir, exist_ok=True)
    resolved = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    return MetricsLogger(cfg.run.dir, True, cfg.wandb, resolved, None)


def accumulate_gradients(loss_of, loader, accum: int) -> list:
    """Forward and backward over `accum` micro-batches (each loss scaled by 1/accum); their losses."""
    losses = []
    for _ in range(accum):
        loss = loss_of(next(loader))
        (loss / accum).backward()
        losses.append(loss.detach())
    return losses


def step_metrics(step: int, losses: list, lr: float, grad_norm, throughput, device, tokens_seen: int) -> dict:
    """One optimizer step's record, with the trainer's keys in its order (the rate is taken after the
    loss's host sync, so the interval holds the step's device work)."""
    from ..components.metrics import peak_memory_gib

    return {
        "step": step,
        "loss": torch.stack(losses).mean().item(),
        "lr": lr,
        "grad_norm": float(grad_norm),
        "tokens_per_s": throughput.rate(tokens_seen),
        "peak_mem_gib": peak_memory_gib(device),
        "tokens_seen": tokens_seen,
    }


@torch.no_grad()
def validation_loss(model, loss_of, val_loader) -> float:
    """Token-weighted mean loss over the validation loader's pass (build_loaders capped it at
    train.eval_batches batches' worth of sequences, as for the trainer)."""
    model.eval()
    total, n = 0.0, 0
    for batch in val_loader:
        count = int((batch["labels"] != -100).sum())
        total, n = total + loss_of(batch).item() * count, n + count
    model.train()
    return total / max(n, 1)
