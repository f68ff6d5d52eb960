"""Pretraining entry point (Hydra app; config root configs/config.yaml).

    python -m retnet_train.train experiment=tiny_cpu
    torchrun --nproc_per_node=8 -m retnet_train.train experiment=retnet_1.3b_8k wandb.mode=online
    deepspeed --num_gpus 8 --module retnet_train.train experiment=retnet_1.3b_8k
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import asdict

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from .components.checkpoint import CheckpointManager, resolve_resume
from .components.faults import OOM_HINT, NonFiniteTracker, TrainingError, inject
from .components.config import TrainConfig, check_values, config_diff, data_sources, grad_accumulation, register
from .components.metrics import MetricsLogger, Throughput, device_peak_flops, peak_memory_gib
from .components.optim import build_optimizer, deepspeed_config, skip_duplicate_overflow_check
from .components.preemption import PreemptionHandler
from .components.profiling import Profiler
from .components.reshard import prepare_resume, run_layout
from .components.rng import seed_everything
from .data import TokenLoader, build_validation_loader, sha256_file
from .model import build_model, model_config_from_dict
from .model.flops import flops_per_token
from .parallel import build_context_parallel, loss_weight, parallelize

def init_distributed(device: torch.device, timeout=None) -> None:
    """NCCL on GPU, gloo on CPU; `timeout` (a timedelta) for collectives, else the defaults."""
    import deepspeed

    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {} if timeout is None else {"timeout": timeout}
    if "RANK" not in os.environ:
        # A plain `python -m`: a world of one on an in-memory store, so no TCP port can collide
        # with another run on the machine.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    deepspeed.init_distributed(dist_backend=backend, **kwargs)  # wraps the group above, or joins torchrun's


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but no CUDA/ROCm device is visible")
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


@torch.no_grad()
def evaluate(engine, loader, max_batches: int, device, cp=None) -> float:
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        if cp is not None:
            batch = cp.shard_batch(batch)
        n = loss_weight(cp, batch["labels"])  # tokens this rank's loss stands for
        total += torch.stack([engine(**batch, return_logits=False).loss.double() * n, n.double()])
    engine.train()
    if dist.is_initialized():
        dist.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).item()


def run(cfg: TrainConfig) -> dict:
    """Train per the config; returns a summary (last step, loss, checkpoint path, skipped steps).

    Reusable: a benchmark or another driver builds a TrainConfig (or composes it with Hydra) and
    calls this; it initializes the process group itself when none exists.
    """
    import deepspeed

    check_values(cfg)
    device = pick_device(cfg.train.device)
    init_distributed(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    is_main = rank == 0
    # context parallel: P consecutive ranks share each sequence; the data comes per data-parallel rank
    cp, dp_rank, dp_world = build_context_parallel(cfg.parallel.context_parallel_size, rank, world, cfg.data.seq_len)
    accum = grad_accumulation(cfg, world)
    seed_everything(cfg.train.seed + rank)

    model_cfg = model_config_from_dict(cfg.model)
    model = build_model(model_cfg)
    parallelize(model, compile=cfg.train.compile, activation_checkpointing=cfg.train.activation_checkpointing,
                activation_memory_budget=cfg.train.activation_memory_budget, context_parallel=cp)

    tokenizer_sha = sha256_file(cfg.data.tokenizer) if cfg.data.tokenizer else None
    sources = data_sources(cfg)
    loader = TokenLoader(sources, cfg.data.seq_len, cfg.train.micro_batch_size, dp_rank, dp_world, cfg.data.seed,
                         "train", tokenizer_sha256=tokenizer_sha, vocab_size=model_cfg.vocab_size,
                         verify_checksums=cfg.data.verify_checksums)
    val_loader = build_validation_loader(sources, cfg.data.seq_len, cfg.train.micro_batch_size, dp_rank, dp_world,
                                         tokenizer_sha256=tokenizer_sha, vocab_size=model_cfg.vocab_size,
                                         max_sequences=cfg.train.eval_batches * cfg.train.micro_batch_size * dp_world)

    run_dir = cfg.run.dir
    ckpt = CheckpointManager(cfg.checkpoint.dir or os.path.join(run_dir, "checkpoints"), cfg.checkpoint.keep_last, rank)
    source = resolve_resume(cfg.train.resume, ckpt)  # before anything is written: refuses to clobber checkpoints
    layout = run_layout(cfg, world)
    plan = prepare_resume(source, layout, rank)  # another world size / ZeRO stage: converted (universal) here

    try:
        optimizer, scheduler = build_optimizer(model, cfg, device)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=deepspeed_config(cfg, accum, world, load_universal=bool(plan and plan.universal)))
        skip_duplicate_overflow_check(engine)
    except torch.cuda.OutOfMemoryError as e:
        raise TrainingError(f"{OOM_HINT}\n{e}") from e

    resolved = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    step, tokens_seen, wandb_id = 0, 0, None
    if source is not None:
        client = ckpt.load(engine, source[1], directory=source[0], plan=plan, reseed=cfg.train.seed)
        loader.load_state_dict(client["data"])
        step, tokens_seen, wandb_id = client["step"], client["tokens_seen"], client.get("wandb_id")
        if is_main:
            print(f"resumed from {os.path.join(*source)} at step {step} ({tokens_seen:,} tokens seen)"
                  + (f" ({', '.join(plan.notes)})" if plan.notes else ""), flush=True)
            changed = config_diff(client.get("config") or {}, resolved)
            if changed:
                print("config changed since that checkpoint: " + "; ".join(changed), flush=True)
    elif is_main:
        print(f"no checkpoint in {ckpt.dir}: starting fresh" if cfg.train.resume == "auto" else "starting fresh", flush=True)

    tokens_per_step = accum * cfg.train.micro_batch_size * cfg.data.seq_len * dp_world
    if is_main:
        os.makedirs(run_dir, exist_ok=True)
        OmegaConf.save(OmegaConf.create(resolved), os.path.join(run_dir, "config.yaml"))
        ranks = f"world {world} ({dp_world} data x {world // dp_world} context parallel)" if cp else f"world {world}"
        print(f"{ranks} | micro-batch {cfg.train.micro_batch_size} x seq {cfg.data.seq_len} | accumulation {accum} "
              f"| {tokens_per_step:,} tokens/step | {tokens_per_step * cfg.train.max_steps:,} tokens total "
              f"| {model.num_params():,} parameters | ZeRO {cfg.deepspeed.zero_stage} {cfg.deepspeed.precision} "
              f"| device {device.type}", flush=True)
    profiler = Profiler(os.path.join(run_dir, "profile", f"rank{rank}"), rank, world, device.type, step,
                        **asdict(cfg.profile))
    logger = MetricsLogger(run_dir, is_main, cfg.wandb, resolved, wandb_id)
    flops = flops_per_token(model_cfg, cfg.data.seq_len)["model"]
    peak = device_peak_flops(device, cfg.train.peak_flops)
    preempt = PreemptionHandler()
    faults = NonFiniteTracker(cfg.train.max_consecutive_nonfinite, scaler_skips_are_normal=cfg.deepspeed.precision == "fp16")
    if source is not None and "faults" in client:
        faults.load_state_dict(client["faults"])

    def save() -> str:
        client = {"data": loader.state_dict(), "step": step, "tokens_seen": tokens_seen,
                  "wandb_id": logger.wandb_id, "faults": faults.state_dict(), "config": resolved,
                  "layout": layout}
        return ckpt.save(engine, step, client)

    last_path, loss_value = None, float("nan")
    if step >= cfg.train.max_steps and is_main:
        print(f"already at step {step} >= train.max_steps={cfg.train.max_steps}: nothing to train. "
              f"Raise train.max_steps to continue this run, or use a new run.dir to start another", flush=True)
        last_path = os.path.join(*source) if source else None
    bar = tqdm(total=cfg.train.max_steps, initial=step, unit="step", dynamic_ncols=True,
               disable=True if not is_main else None)  # None: shown on a terminal only
    throughput = Throughput(tokens_seen)
    try:
        while step < cfg.train.max_steps:
            with throughput.paused():  # closing the window writes the trace: not training time
                profiler.step(step)  # opens, marks and closes the profiled window of steps
            step_losses = []
            for _ in range(accum):
                batch = {k: v.to(device, non_blocking=True) for k, v in next(loader).items()}
                if cp is not None:
                    batch = cp.shard_batch(batch)  # this rank's seq_len / P tokens of each sequence
                loss = engine(**batch, return_logits=False).loss
                loss = inject(loss, step + 1, cfg.train.inject_nonfinite_at, cfg.train.inject_nonfinite_grad_at)
                # A non-finite loss gives non-finite gradients on every rank (they are all-reduced),
                # and the optimizer then skips the update: DeepSpeed's overflow check (invalid grad
                # norm: bf16, fp16, ZeRO 1-3), or our GuardedAdamW where DeepSpeed has none (fp32 ZeRO-0).
                engine.backward(loss)
                engine.step()
                step_losses.append(loss.detach().float())
            step += 1
            tokens_seen += tokens_per_step
            bar.update(1)
            # One all-reduce per step (no host sync per micro-batch):
            # [non-finite loss, update skipped (non-finite grad norm), loss sum, preemption signal]
            losses_t = torch.stack(step_losses)
            stats = torch.stack([(~torch.isfinite(losses_t)).any().float(),
                                 torch.tensor(0.0 if engine.was_step_applied() else 1.0, device=device),
                                 torch.nan_to_num(losses_t.mean(), nan=0.0, posinf=0.0, neginf=0.0),
                                 torch.tensor(1.0 if preempt.received else 0.0, device=device)])
            dist.all_reduce(stats)
            loss_bad, stop = stats[0].item() > 0, stats[3].item() > 0
            skipped = faults.update(loss_bad, stats[1].item() > 0)
            if not skipped:
                loss_value = stats[2].item() / world
            if step % cfg.train.log_interval == 0 or step == cfg.train.max_steps or skipped:
                tps = throughput.rate(tokens_seen)
                grad_norm = engine.get_global_grad_norm()
                grad_norm = None if grad_norm is None or not math.isfinite(float(grad_norm)) else float(grad_norm)
                logger.log({"step": step, "loss": None if skipped else loss_value, "lr": scheduler.get_last_lr()[0],
                            "grad_norm": grad_norm, "tokens_per_s": tps,
                            "mfu": tps * flops / (peak * world) if peak else None,
                            "peak_mem_gib": peak_memory_gib(device), "tokens_seen": tokens_seen,
                            "skipped_steps": faults.total})
                if skipped and is_main:
                    why = "non-finite loss" if loss_bad else "non-finite gradient norm"
                    logger.write(f"step {step} skipped ({why}): no update; {faults.consecutive} in a row, "
                                 f"{faults.total} in total")
            if faults.should_stop:
                last_path = save()  # skipped steps left the weights as the last good step made them
                raise TrainingError(f"{faults.consecutive} consecutive steps with non-finite loss or gradients "
                                    f"(train.max_consecutive_nonfinite={cfg.train.max_consecutive_nonfinite}); stopped. "
                                    f"The weights of the last good step ({step - faults.consecutive}) are saved "
                                    f"in {last_path}")
            if step % cfg.train.eval_interval == 0 or step == cfg.train.max_steps:
                with throughput.paused():
                    val = evaluate(engine, val_loader, cfg.train.eval_batches, device, cp)
                logger.log({"step": step, "val_loss": val, "val_ppl": math.exp(min(val, 50.0))})
            if step % cfg.checkpoint.interval == 0 or stop or (step == cfg.train.max_steps and cfg.checkpoint.save_at_end):
                with throughput.paused():
                    last_path = save()
            if stop:
                if is_main:
                    logger.write(f"{preempt.received or 'signal on another rank'}: checkpoint saved to {last_path} "
                                 f"at step {step}; exiting (resume with the same command)")
                break
    except torch.cuda.OutOfMemoryError as e:
        raise TrainingError(f"{OOM_HINT}\n{e}") from e
    finally:
        profiler.close()  # a window cut short (end of run, error) is still written
        bar.close()
        preempt.restore()
        logger.close()
    if is_main:
        print(f"done at step {step}: metrics in {logger.path}, checkpoint in {last_path}", flush=True)
    return {"step": step, "loss": loss_value, "checkpoint": last_path, "skipped_steps": faults.total,
            "tokens_seen": tokens_seen}


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
