"""The Trainer: builds a run from its typed config, restores it from a checkpoint, and steps it.

    trainer = Trainer(cfg)
    summary = trainer.train()   # build(), restore(), then train_step() and the log / evaluate / save policies

Everything the checkpoint restores is a stateful part (`state`: TrainState, `loader`: TokenLoader),
saved as one dict beside DeepSpeed's state (components/checkpoint.py).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from tqdm import tqdm

from .components.checkpoint import CheckpointManager, client_state, load_initial_weights, load_parts, resolve_resume
from .components.checkpoint_discovery import model_states_file
from .components.config import TrainConfig, check_values, config_diff, data_sources, grad_accumulation
from .components.distributed import init_distributed, pick_device
from .components.faults import OOM_HINT, NonFiniteTracker, TrainingError, inject
from .components.metrics import MetricsLogger, Throughput, device_peak_flops, peak_memory_gib
from .components.optim import build_optimizer, deepspeed_config, skip_duplicate_overflow_check
from .components.preemption import PreemptionHandler
from .components.profiling import Profiler
from .components.reshard import prepare_resume, run_layout
from .components.rng import seed_everything
from .components.run_dir import DirLock, same_dir, set_aside_metrics, write_problem
from .components.train_state import TrainState
from .components.validation import mean_loss
from .data import TokenLoader, build_validation_loader, sha256_file
from .model import build_model, model_config_from_dict
from .model.flops import flops_per_token
from .parallel import build_context_parallel, parallelize


@dataclass
class StepStats:
    """One optimizer step, as every rank agreed on it (one all-reduce)."""

    step: int
    loss: Optional[float]  # mean over ranks and micro-batches; None when the step was skipped
    loss_nonfinite: bool  # some rank saw a non-finite loss
    skipped: bool  # no update: non-finite loss or gradient norm
    stop_requested: bool  # some rank got SIGTERM / SIGUSR1


class Trainer:
    def __init__(self, cfg: TrainConfig):
        check_values(cfg)
        self.cfg = cfg
        self.profiler = self.bar = self.preempt = self.logger = None
        self.locks: list = []
        self.last_checkpoint: Optional[str] = None
        self.last_loss = float("nan")

    # ------------------------------------------------------------------ build and restore

    def build(self) -> None:
        """Process group, model, data, DeepSpeed engine and the checkpoint to resume from (if any)."""
        import deepspeed

        cfg = self.cfg
        self.device = pick_device(cfg.train.device)
        init_distributed(self.device)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.ckpt = CheckpointManager(
            cfg.checkpoint.dir or os.path.join(cfg.run.dir, "checkpoints"), cfg.checkpoint.keep_last, self.rank
        )
        self._claim_dirs()
        # context parallel: P consecutive ranks share each sequence; the data comes per data-parallel rank
        self.cp, dp_rank, self.dp_world = build_context_parallel(
            cfg.parallel.context_parallel_size, self.rank, self.world, cfg.data.seq_len
        )
        self.accum = grad_accumulation(cfg, self.world)
        self.tokens_per_step = self.accum * cfg.train.micro_batch_size * cfg.data.seq_len * self.dp_world
        seed_everything(cfg.train.seed + self.rank)
        self.model_cfg = model_config_from_dict(cfg.model)
        self.model = self._build_model()
        self.loader, self.val_loader = self._build_data(dp_rank)

        self.source = resolve_resume(cfg.train.resume, self.ckpt)  # before anything is written: refuses to clobber
        self.layout = run_layout(cfg, self.world)
        self.plan = prepare_resume(self.source, self.layout, self.rank)  # another world size / ZeRO stage: converted
        try:
            optimizer, self.scheduler = build_optimizer(self.model, cfg, self.device)
            universal = bool(self.plan and self.plan.universal)
            ds_config = deepspeed_config(cfg, self.accum, self.world, load_universal=universal)
            self.engine, _, _, _ = deepspeed.initialize(
                model=self.model, optimizer=optimizer, lr_scheduler=self.scheduler, config=ds_config
            )
            skip_duplicate_overflow_check(self.engine)
        except torch.cuda.OutOfMemoryError as e:
            raise TrainingError(f"{OOM_HINT}\n{e}") from e
        faults = NonFiniteTracker(
            cfg.train.max_consecutive_nonfinite, scaler_skips_are_normal=cfg.deepspeed.precision == "fp16"
        )
        self.state = TrainState(faults=faults)
        self.resolved = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)

    def _claim_dirs(self) -> None:
        """Before anything is built: every directory this rank will write must be writable, and rank 0
        locks the run's directories against a second trainer. Every rank raises the first problem."""
        cfg = self.cfg
        writes = [("run.dir", cfg.run.dir)] if self.is_main else []
        writes.append(("checkpoint.dir", self.ckpt.dir))  # every rank writes its shards and RNG state there
        if cfg.profile.enabled and self.rank in cfg.profile.ranks:
            writes.append(("profile.enabled", os.path.join(cfg.run.dir, "profile", f"rank{self.rank}")))
        problem = next(filter(None, (write_problem(key, path) for key, path in writes)), None)
        if problem is None and self.is_main:
            # both: another run's checkpoint.dir may point into this run.dir, or the other way round
            owned = [("run.dir", cfg.run.dir), ("checkpoint.dir", self.ckpt.dir)]
            for key, path in owned[:1] if same_dir(cfg.run.dir, self.ckpt.dir) else owned:
                lock = DirLock(path, key)
                self.locks.append(lock)
                problem = lock.acquire()
                if problem:
                    break
        self._agree(problem)

    def _agree(self, problem: Optional[str]) -> None:
        """Every rank raises the first rank's problem (a collective: a rank that failed alone would leave
        the others waiting in the next one)."""
        problems = [None] * self.world
        dist.all_gather_object(problems, problem)
        first = next(filter(None, problems), None)
        if first:
            raise ValueError(first)

    def _build_model(self):
        train = self.cfg.train
        model = build_model(self.model_cfg)
        if train.init_weights:
            load_initial_weights(model, train.init_weights)
            if self.is_main:
                print(f"initial weights from {train.init_weights}", flush=True)
        return parallelize(
            model,
            compile=train.compile,
            activation_checkpointing=train.activation_checkpointing,
            activation_memory_budget=train.activation_memory_budget,
            context_parallel=self.cp,
        )

    def _build_data(self, dp_rank: int):
        cfg = self.cfg
        if cfg.data.tokenizer and not os.path.isfile(cfg.data.tokenizer):
            raise ValueError(
                f"data.tokenizer={cfg.data.tokenizer}: no such file (from {os.getcwd()}); "
                "data.tokenizer=null skips the check that the shards were tokenized with it"
            )
        tokenizer_sha = sha256_file(cfg.data.tokenizer) if cfg.data.tokenizer else None
        sources, vocab = data_sources(cfg), self.model_cfg.vocab_size
        loader = TokenLoader(
            sources,
            cfg.data.seq_len,
            cfg.train.micro_batch_size,
            dp_rank,
            self.dp_world,
            cfg.data.seed,
            "train",
            tokenizer_sha256=tokenizer_sha,
            vocab_size=vocab,
            verify_checksums=cfg.data.verify_checksums,
        )
        val_loader = build_validation_loader(
            sources,
            cfg.data.seq_len,
            cfg.train.micro_batch_size,
            dp_rank,
            self.dp_world,
            tokenizer_sha256=tokenizer_sha,
            vocab_size=vocab,
            max_sequences=cfg.train.eval_batches * cfg.train.micro_batch_size * self.dp_world,
        )
        return loader, val_loader

    @property
    def stateful(self) -> dict:
        """The parts a checkpoint restores, by their name in its client state."""
        return {"train_state": self.state, "data_loader": self.loader}

    def restore(self) -> None:
        """Load the checkpoint build() chose into the engine and the stateful parts."""
        if self.source is None:
            if self.is_main:
                fresh = (
                    f"no checkpoint in {self.ckpt.dir}: starting fresh"
                    if self.cfg.train.resume == "auto"
                    else "starting fresh"
                )
                print(fresh, flush=True)
            return
        directory, tag = self.source
        try:
            client = self.ckpt.load(self.engine, tag, directory=directory, plan=self.plan, reseed=self.cfg.train.seed)
        except RuntimeError as e:  # torch's load_state_dict: the weights do not fit this model
            raise ValueError(self._misfit(os.path.join(directory, tag), e)) from None
        load_parts(client, self.stateful, os.path.join(directory, tag))
        self.last_checkpoint = os.path.join(directory, tag)
        if self.is_main:
            notes = f" ({', '.join(self.plan.notes)})" if self.plan.notes else ""
            print(
                f"resumed from {self.last_checkpoint} at step {self.state.step} "
                f"({self.state.tokens_seen:,} tokens seen){notes}",
                flush=True,
            )
            changed = config_diff(client.get("config") or {}, self.resolved)
            if changed:
                print("config changed since that checkpoint: " + "; ".join(changed), flush=True)

    def _misfit(self, path: str, error: RuntimeError) -> str:
        """One line on a checkpoint whose weights do not load: torch's first complaint and the model.*
        settings that differ from the checkpoint's."""
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = (lines[1] if len(lines) > 1 else lines[0] if lines else type(error).__name__)[:300]
        saved = torch.load(model_states_file(path), map_location="cpu", weights_only=False, mmap=True)
        changed = config_diff((saved.get("config") or {}).get("model") or {}, self.resolved["model"], "model.")
        return f"train.resume: {path} does not load into this model ({detail})" + (
            f"; model settings differ from the checkpoint's: {'; '.join(changed)}" if changed else ""
        )

    def _open_outputs(self) -> None:
        """Run dir, console banner, metrics, profiler, progress bar and the signal handler."""
        cfg, run_dir = self.cfg, self.cfg.run.dir
        problem = None
        try:  # rank 0's files and W&B; the profiler checks profile.ranks on every rank
            self._open_run_files()
            self.profiler = Profiler(
                os.path.join(run_dir, "profile", f"rank{self.rank}"),
                self.rank,
                self.world,
                self.device.type,
                self.state.step,
                **asdict(cfg.profile),
            )
        except (ValueError, OSError) as e:
            problem = str(e)
        self._agree(problem)
        self.flops = flops_per_token(self.model_cfg, cfg.data.seq_len)["model"]
        self.peak = device_peak_flops(self.device, cfg.train.peak_flops)
        self.preempt = PreemptionHandler()
        self.throughput = Throughput(self.state.tokens_seen)
        self.bar = tqdm(
            total=cfg.train.max_steps,
            initial=self.state.step,
            unit="step",
            dynamic_ncols=True,
            disable=True if not self.is_main else None,
        )  # None: shown on a terminal only

    def _open_run_files(self) -> None:
        """Rank 0: run dir, config.yaml (resolved), the banner. Every rank: the metrics logger (which
        writes metrics.jsonl and W&B on rank 0 only)."""
        run_dir = self.cfg.run.dir
        if self.is_main:
            os.makedirs(run_dir, exist_ok=True)
            continues = self.source is not None and os.path.abspath(self.source[0]) == os.path.abspath(self.ckpt.dir)
            moved = None if continues else set_aside_metrics(run_dir)
            if moved:
                print(
                    f"{run_dir} holds metrics of an earlier run without its checkpoints: kept as {moved}; "
                    f"this run logs to a new metrics.jsonl",
                    flush=True,
                )
            OmegaConf.save(OmegaConf.create(self.resolved), os.path.join(run_dir, "config.yaml"))
            self._print_banner()
        self.logger = MetricsLogger(run_dir, self.is_main, self.cfg.wandb, self.resolved, self.state.wandb_id)
        self.state.wandb_id = self.logger.wandb_id

    def _print_banner(self) -> None:
        cfg, world = self.cfg, self.world
        ranks = (
            f"world {world} ({self.dp_world} data x {world // self.dp_world} context parallel)"
            if self.cp
            else f"world {world}"
        )
        print(
            f"{ranks} | micro-batch {cfg.train.micro_batch_size} x seq {cfg.data.seq_len} | accumulation "
            f"{self.accum} | {self.tokens_per_step:,} tokens/step | {self.tokens_per_step * cfg.train.max_steps:,} "
            f"tokens total | {self.model.num_params():,} parameters | ZeRO {cfg.deepspeed.zero_stage} "
            f"{cfg.deepspeed.precision} | device {self.device.type}",
            flush=True,
        )

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict:
        """Train to train.max_steps (or a stop signal); returns a summary of the run."""
        try:
            self.build()
            self.restore()
            self._open_outputs()
            max_steps, stats = self.cfg.train.max_steps, None
            if self.state.step >= max_steps and self.is_main:
                print(
                    f"already at step {self.state.step} >= train.max_steps={max_steps}: nothing to train. "
                    f"Raise train.max_steps to continue this run, or use a new run.dir to start another",
                    flush=True,
                )
            while self.state.step < max_steps:
                with self.throughput.paused():  # closing the window writes the trace: not training time
                    self.profiler.step(self.state.step)  # opens, marks and closes the profiled window
                stats = self.train_step()
                self.maybe_log(stats)
                self.stop_on_faults()
                self.maybe_evaluate()
                self.maybe_save(stats)
                if stats.stop_requested:
                    break
        except torch.cuda.OutOfMemoryError as e:
            raise TrainingError(f"{OOM_HINT}\n{e}") from e
        except OSError as e:  # a file the run reads or writes: disk full, permissions, a mount gone
            state = getattr(self, "state", None)
            where = f" at step {state.step}" if state is not None else " at start"
            raise TrainingError(
                f"{e.filename or 'I/O'}: {e.strerror or e}{where}; the last checkpoint is "
                f"{self.last_checkpoint or 'none'}"
            ) from e
        finally:
            self.close()
        preempted = bool(stats and stats.stop_requested)
        if self.is_main and not preempted:
            print(
                f"done at step {self.state.step}: metrics in {self.logger.path}, checkpoint in {self.last_checkpoint}",
                flush=True,
            )
        return {
            "step": self.state.step,
            "loss": self.last_loss,
            "checkpoint": self.last_checkpoint,
            "skipped_steps": self.state.faults.total,
            "tokens_seen": self.state.tokens_seen,
            "preempted": preempted,
        }

    def train_step(self) -> StepStats:
        """accumulation micro-batches, one optimizer step, one all-reduce of what every rank saw."""
        cfg, engine = self.cfg.train, self.engine
        losses = []
        for _ in range(self.accum):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in next(self.loader).items()}
            if self.cp is not None:
                batch = self.cp.shard_batch(batch)  # this rank's seq_len / P tokens of each sequence
            loss = engine(**batch, return_logits=False).loss
            loss = inject(loss, self.state.step + 1, cfg.inject_nonfinite_at, cfg.inject_nonfinite_grad_at)
            # A non-finite loss gives non-finite gradients on every rank (they are all-reduced), and
            # the optimizer then skips the update: DeepSpeed's overflow check (invalid grad norm: bf16,
            # fp16, ZeRO 1-3), or our GuardedAdamW where DeepSpeed has none (fp32 ZeRO-0).
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach().float())
        self.state.step += 1
        self.state.tokens_seen += self.tokens_per_step
        self.bar.update(1)
        # One all-reduce per step (no host sync per micro-batch):
        # [non-finite loss, update skipped (non-finite grad norm), loss sum, stop signal]
        losses_t = torch.stack(losses)
        flags = torch.stack(
            [
                (~torch.isfinite(losses_t)).any().float(),
                torch.tensor(0.0 if engine.was_step_applied() else 1.0, device=self.device),
                torch.nan_to_num(losses_t.mean(), nan=0.0, posinf=0.0, neginf=0.0),
                torch.tensor(1.0 if self.preempt.received else 0.0, device=self.device),
            ]
        )
        dist.all_reduce(flags)
        loss_bad, update_skipped, loss_sum, stop = flags.tolist()
        skipped = self.state.faults.update(loss_bad > 0, update_skipped > 0)
        if not skipped:
            self.last_loss = loss_sum / self.world
        return StepStats(self.state.step, None if skipped else self.last_loss, loss_bad > 0, skipped, stop > 0)

    # ------------------------------------------------------------------ policies

    def maybe_log(self, stats: StepStats) -> None:
        """Every train.log_interval steps, at the last step, and at every skipped step."""
        if not (
            stats.step % self.cfg.train.log_interval == 0 or stats.step == self.cfg.train.max_steps or stats.skipped
        ):
            return
        tps = self.throughput.rate(self.state.tokens_seen)
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = None if grad_norm is None or not math.isfinite(float(grad_norm)) else float(grad_norm)
        self.logger.log(
            {
                "step": stats.step,
                "loss": stats.loss,
                "lr": self.scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "tokens_per_s": tps,
                "mfu": tps * self.flops / (self.peak * self.world) if self.peak else None,
                "peak_mem_gib": peak_memory_gib(self.device),
                "tokens_seen": self.state.tokens_seen,
                "skipped_steps": self.state.faults.total,
            }
        )
        if stats.skipped and self.is_main:
            why = "non-finite loss" if stats.loss_nonfinite else "non-finite gradient norm"
            faults = self.state.faults
            self.logger.write(
                f"step {stats.step} skipped ({why}): no update; {faults.consecutive} in a row, {faults.total} in total"
            )

    def stop_on_faults(self) -> None:
        """Too many non-finite steps in a row: save the last good weights and stop with an error."""
        faults = self.state.faults
        if not faults.should_stop:
            return
        path = self.save()  # skipped steps left the weights as the last good step made them
        raise TrainingError(
            f"{faults.consecutive} consecutive steps with non-finite loss or gradients "
            f"(train.max_consecutive_nonfinite={faults.max_consecutive}); stopped. The weights of "
            f"the last good step ({self.state.step - faults.consecutive}) are saved in {path}"
        )

    def maybe_evaluate(self) -> Optional[float]:
        """Validation loss every train.eval_interval steps and at the last step."""
        step, cfg = self.state.step, self.cfg.train
        if not (step % cfg.eval_interval == 0 or step == cfg.max_steps):
            return None
        with self.throughput.paused():
            val = mean_loss(
                self.engine, self.val_loader, self.device, cfg.eval_batches, self.cp, sum_over_ranks=True
            ).loss
        self.logger.log({"step": step, "val_loss": val, "val_ppl": math.exp(min(val, 50.0))})
        return val

    def maybe_save(self, stats: StepStats) -> Optional[str]:
        """Every checkpoint.interval steps, at a stop signal, and at the end (checkpoint.save_at_end)."""
        step, cfg = self.state.step, self.cfg.checkpoint
        final = step == self.cfg.train.max_steps and cfg.save_at_end
        if not (step % cfg.interval == 0 or stats.stop_requested or final):
            return None
        with self.throughput.paused():
            path = self.save()
        if stats.stop_requested and self.is_main:
            self.logger.write(
                f"{self.preempt.received or 'signal on another rank'}: checkpoint saved to {path} "
                f"at step {step}; exiting (resume with the same command)"
            )
        return path

    def save(self) -> str:
        client = client_state(self.stateful, config=self.resolved, layout=self.layout)
        self.last_checkpoint = self.ckpt.save(self.engine, self.state.step, client)
        return self.last_checkpoint

    def close(self) -> None:
        """Write what is open (a profiled window cut short, metrics) and give back the signal handlers."""
        if self.profiler is not None:
            self.profiler.close()
        if self.bar is not None:
            self.bar.close()
        if self.preempt is not None:
            self.preempt.restore()
        if self.logger is not None:
            self.logger.close()
        for lock in reversed(self.locks):
            lock.release()
        self.locks = []
