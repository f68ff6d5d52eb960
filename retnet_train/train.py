"""Pretraining entry point (Hydra app; config root configs/config.yaml).

    python -m retnet_train.train experiment=tiny_cpu
    torchrun --nproc_per_node=8 -m retnet_train.train experiment=retnet_1.3b_8k wandb.mode=online
    deepspeed --num_gpus 8 --module retnet_train.train experiment=retnet_1.3b_8k
"""
from __future__ import annotations

import math
import os
import socket
import sys
import time

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from .components.checkpoint import CheckpointManager
from .components.config import TrainConfig, check_values, data_sources, grad_accumulation, register
from .components.metrics import MetricsLogger, device_peak_flops, peak_memory_gib
from .components.optim import build_optimizer, deepspeed_config
from .components.preemption import PreemptionHandler
from .components.rng import seed_everything
from .data import TokenLoader, build_validation_loader, sha256_file
from .model import build_model, model_config_from_dict
from .model.flops import flops_per_token

OOM_HINT = ("out of GPU memory: lower train.micro_batch_size (raising accumulation), set "
            "train.activation_checkpointing=true, raise deepspeed.zero_stage, or enable "
            "deepspeed.offload_optimizer / deepspeed.offload_param (ZeRO-3)")


class TrainingError(RuntimeError):
    pass


def init_distributed(device: torch.device) -> None:
    import deepspeed

    if "RANK" not in os.environ:  # a plain `python -m`: a world of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but no CUDA/ROCm device is visible")
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


@torch.no_grad()
def evaluate(engine, loader, max_batches: int, device) -> float:
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        n = (batch["labels"] != -100).sum()
        total += torch.stack([engine(**batch, return_logits=False).loss.double() * n, n.double()])
    engine.train()
    if dist.is_initialized():
        dist.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).item()


def run(cfg: TrainConfig) -> dict:
    """Train per the config; returns a summary (last step, loss, checkpoint path)."""
    import deepspeed

    check_values(cfg)
    device = pick_device(cfg.train.device)
    init_distributed(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    is_main = rank == 0
    accum = grad_accumulation(cfg, world)
    seed_everything(cfg.train.seed + rank)

    model_cfg = model_config_from_dict(cfg.model)
    model = build_model(model_cfg)
    if cfg.train.activation_checkpointing:
        model.set_activation_checkpointing(True)
    if cfg.train.compile:
        model.compile_blocks()

    tokenizer_sha = sha256_file(cfg.data.tokenizer) if cfg.data.tokenizer else None
    loader = TokenLoader(data_sources(cfg), cfg.data.seq_len, cfg.train.micro_batch_size, rank, world, cfg.data.seed,
                         "train", tokenizer_sha256=tokenizer_sha, vocab_size=model_cfg.vocab_size,
                         verify_checksums=cfg.data.verify_checksums)
    val_loader = build_validation_loader(data_sources(cfg), cfg.data.seq_len, cfg.train.micro_batch_size, rank, world,
                                         tokenizer_sha256=tokenizer_sha, vocab_size=model_cfg.vocab_size,
                                         max_sequences=cfg.train.eval_batches * cfg.train.micro_batch_size * world)

    optimizer, scheduler = build_optimizer(model, cfg, device)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, accum))

    run_dir = cfg.run.dir
    ckpt = CheckpointManager(cfg.checkpoint.dir or os.path.join(run_dir, "checkpoints"), cfg.checkpoint.keep_last, rank)
    resolved = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    step, tokens_seen, wandb_id = 0, 0, None
    tag = None if cfg.train.resume == "never" else (ckpt.latest_valid() if cfg.train.resume == "auto" else cfg.train.resume)
    if tag is not None:
        if cfg.train.resume not in ("auto", "never"):  # an explicit <dir>/<tag> path
            ckpt.dir, tag = os.path.split(os.path.abspath(tag.rstrip("/")))
        client = ckpt.load(engine, tag)
        loader.load_state_dict(client["data"])
        step, tokens_seen, wandb_id = client["step"], client["tokens_seen"], client.get("wandb_id")
        if is_main:
            print(f"resumed from {os.path.join(ckpt.dir, tag)} at step {step}", flush=True)
    elif is_main:
        print(f"no checkpoint in {ckpt.dir}: starting fresh" if cfg.train.resume == "auto" else "starting fresh", flush=True)

    tokens_per_step = accum * cfg.train.micro_batch_size * cfg.data.seq_len * world
    if is_main:
        os.makedirs(run_dir, exist_ok=True)
        OmegaConf.save(OmegaConf.create(resolved), os.path.join(run_dir, "config.yaml"))
        print(f"world {world} | micro-batch {cfg.train.micro_batch_size} x seq {cfg.data.seq_len} | accumulation {accum} "
              f"| {tokens_per_step:,} tokens/step | {tokens_per_step * cfg.train.max_steps:,} tokens total "
              f"| {model.num_params():,} parameters | device {device.type}", flush=True)
    logger = MetricsLogger(run_dir, is_main, cfg.wandb, resolved, wandb_id)
    flops = flops_per_token(model_cfg, cfg.data.seq_len)["model"]
    peak = device_peak_flops(device, cfg.train.peak_flops)
    preempt = PreemptionHandler()

    def save() -> str:
        client = {"data": loader.state_dict(), "step": step, "tokens_seen": tokens_seen,
                  "wandb_id": logger.wandb_id, "config": resolved}
        return ckpt.save(engine, step, client)

    consecutive_bad, skipped_total, last_path, loss_value = 0, 0, None, float("nan")
    t_last, tokens_last = time.perf_counter(), tokens_seen
    try:
        while step < cfg.train.max_steps:
            step_losses = []
            for _ in range(accum):
                batch = {k: v.to(device, non_blocking=True) for k, v in next(loader).items()}
                loss = engine(**batch, return_logits=False).loss
                if step + 1 in cfg.train.inject_nonfinite_at:
                    loss = loss * float("nan")
                # A non-finite loss gives non-finite gradients on every rank (they are all-reduced),
                # and the optimizer then skips the update: DeepSpeed's overflow check, or our
                # GuardedAdamW where DeepSpeed has none (fp32 ZeRO-0).
                engine.backward(loss)
                engine.step()
                step_losses.append(loss.detach().float())
            step += 1
            tokens_seen += tokens_per_step
            # One all-reduce per step (no host sync per micro-batch): [any non-finite, mean loss].
            losses_t = torch.stack(step_losses)
            stats = torch.stack([(~torch.isfinite(losses_t)).any().float(), losses_t.mean()])
            dist.all_reduce(stats)
            bad = bool(stats[0].item() > 0)
            if bad:
                consecutive_bad += 1
                skipped_total += 1
            else:
                consecutive_bad = 0
                loss_value = stats[1].item() / world
            if step % cfg.train.log_interval == 0 or step == cfg.train.max_steps or bad:
                now = time.perf_counter()
                tps = (tokens_seen - tokens_last) / max(now - t_last, 1e-9)
                t_last, tokens_last = now, tokens_seen
                grad_norm = engine.get_global_grad_norm() or getattr(optimizer, "last_grad_norm", None)
                logger.log({"step": step, "loss": None if bad else loss_value, "lr": scheduler.get_last_lr()[0],
                            "grad_norm": None if grad_norm is None or not math.isfinite(float(grad_norm)) else float(grad_norm),
                            "tokens_per_s": tps, "mfu": tps * flops / (peak * world) if peak else None,
                            "peak_mem_gib": peak_memory_gib(device), "tokens_seen": tokens_seen,
                            "skipped_steps": skipped_total})
            if consecutive_bad >= cfg.train.max_consecutive_nonfinite:
                last_path = save()  # skipped steps left the weights as the last good step made them
                raise TrainingError(f"{consecutive_bad} consecutive steps with non-finite loss (train.max_consecutive_nonfinite); "
                                    f"stopped. The last good weights are saved in {last_path}")
            if step % cfg.train.eval_interval == 0 or step == cfg.train.max_steps:
                val = evaluate(engine, val_loader, cfg.train.eval_batches, device)
                logger.log({"step": step, "val_loss": val, "val_ppl": math.exp(min(val, 50.0))})
            stop = preempt.should_stop(device)
            if step % cfg.checkpoint.interval == 0 or step == cfg.train.max_steps or stop:
                last_path = save()
            if stop:
                if is_main:
                    print(f"{preempt.received}: checkpoint saved to {last_path}; exiting", flush=True)
                break
    except torch.cuda.OutOfMemoryError as e:
        raise TrainingError(f"{OOM_HINT}\n{e}") from e
    finally:
        preempt.restore()
        logger.close()
    if is_main:
        print(f"done at step {step}: metrics in {logger.path}, checkpoint in {last_path}", flush=True)
    return {"step": step, "loss": loss_value, "checkpoint": last_path, "skipped_steps": skipped_total}


register()


def _absorb_launcher_args() -> None:
    """The `deepspeed` launcher appends --local_rank=N (unless --no_local_rank): keep it out of
    Hydra's overrides, in the environment where torchrun would have put it."""
    for arg in list(sys.argv[1:]):
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
            sys.argv.remove(arg)


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    typed: TrainConfig = OmegaConf.to_object(cfg)
    try:
        run(typed)
    except (ValueError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    _absorb_launcher_args()
    main()
