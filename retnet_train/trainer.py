"""The Trainer: builds a run from its typed config, restores it from a checkpoint, and steps it.

    trainer = Trainer(cfg)
    summary = trainer.train()   # build(), restore(), then train_step() and the log / evaluate / save policies

Everything the checkpoint restores is a stateful part (`state`: TrainState, `loader`: TokenLoader),
saved as one dict beside DeepSpeed's state (components/checkpoint.py).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .components.banner import start_banner
from .components.checkpoint import CheckpointManager, agreed_parts, agreed_resume, client_state, load_initial_weights
from .components.checkpoint_discovery import tag_step
from .components.config import TrainConfig, check_values, checkpoint_dir, grad_accumulation, resolved_config
from .components.distributed import all_reduce_step, any_rank, init_distributed, pick_device, raise_first_problem
from .components.faults import OOM_HINT, NonFiniteTracker, TrainingError, inject, io_failure
from .components.loaders import build_loaders, tokenizer_record
from .components.metrics import MetricsLogger, Throughput, device_peak_flops, mfu, peak_memory_gib, progress_bar
from .components.optim import build_engine, global_grad_norm
from .components.preemption import PreemptionHandler
from .components.profiling import Profiler, profile_dir
from .components.rank_errors import SameOnEveryRank
from .components.reshard import prepare_resume, run_layout
from .components.resume import done_line, fresh_start_line, load_checkpoint, nothing_to_train_line, resumed_lines
from .components.rng import seed_everything
from .components.run_dir import claim_dirs, continues_run, open_run_dir
from .components.train_state import TrainState
from .components.validation import evaluation_due, mean_loss, validation_metrics
from .model import build_model, model_config_from_dict
from .model.flops import flops_per_token
from .parallel import build_context_parallel, parallelize


@dataclass
class StepStats:
    """One optimizer step, as every rank agreed on it (one all-reduce)."""

    step: int
    lr: float  # the learning rate this step's update used (or would have used, when skipped)
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
        self.source: Optional[tuple] = None  # (directory, tag) of the checkpoint to resume, once built
        self.last_loss = float("nan")
        self.started = False  # built, restored, outputs open: a failure from here on is at a step

    # ------------------------------------------------------------------ build and restore

    def build(self) -> None:
        """Process group, model, data, DeepSpeed engine and the checkpoint to resume from (if any)."""
        cfg = self.cfg
        self.device = pick_device(cfg.train.device, cfg.deepspeed.precision, cfg.model.get("retention_backend"))
        init_distributed(self.device)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.ckpt = CheckpointManager(checkpoint_dir(cfg), cfg.checkpoint.keep_last, self.rank)
        self._claim_dirs()
        dp_rank = self._lay_out_batch()
        self.tokens_per_step = self.accum * cfg.train.micro_batch_size * cfg.data.seq_len * self.dp_world
        seed_everything(cfg.train.seed + self.rank)
        self.model_cfg = model_config_from_dict(cfg.model)
        self.model = self._build_model()
        # which tokenizer the token ids mean, for inference to check against; hashed once at launch, for the
        # loaders' check of the shards too (a relative data.tokenizer is the same file for both)
        self.tokenizer = tokenizer_record(cfg.data.tokenizer)
        sha = self.tokenizer["sha256"] if self.tokenizer else None
        self.loader, self.val_loader = build_loaders(cfg, self.model_cfg.vocab_size, dp_rank, self.dp_world, sha)
        # the loaders check every id against the vocabulary on the host (TokenStream.gather); the
        # model's own check would cost a device-to-host sync at the start of every micro-batch
        self.model.check_inputs = False
        faults = NonFiniteTracker(
            cfg.train.max_consecutive_nonfinite, scaler_skips_are_normal=cfg.deepspeed.precision == "fp16"
        )
        self.state = TrainState(faults=faults)

        self.resolved = resolved_config(cfg)
        # before anything is written: refuses to clobber; then what it refuses of the checkpoint, all in one error
        self.source = agreed_resume(cfg.train.resume, self.ckpt, self.resolved, self.world)
        saved, refused = agreed_parts(self.source, self.stateful, self.world)  # (another data stream: refused below)
        self.layout = run_layout(cfg, self.world)
        groups = cfg.optim.no_decay_embeddings  # another world size / ZeRO: converted; other model/groups/data: refused
        self.plan = prepare_resume(self.source, self.layout, self.rank, dict(cfg.model), groups, saved, refused)
        universal = bool(self.plan and self.plan.universal)
        self.engine, self.scheduler = build_engine(self.model, cfg, self.accum, self.world, self.device, universal)

    def _lay_out_batch(self) -> int:
        """Context-parallel groups and micro-batches per step for this world size; returns this rank's
        data-parallel rank. What does not divide is the config's fault, the same on every rank."""
        cfg = self.cfg
        try:
            # context parallel: P consecutive ranks share each sequence; the data comes per data-parallel rank
            self.cp, dp_rank, self.dp_world = build_context_parallel(
                cfg.parallel.context_parallel_size, self.rank, self.world, cfg.data.seq_len
            )
            self.accum = grad_accumulation(cfg, self.world)
        except ValueError as e:
            raise SameOnEveryRank(str(e)) from None
        return dp_rank

    def _claim_dirs(self) -> None:
        """Before anything is built: every directory this rank will write must be writable, and rank 0
        locks the run's directories against a second trainer. Every rank raises the first problem."""
        profile = self.cfg.profile
        profiled = profile_dir(self.cfg.run.dir, self.rank) if profile.enabled and self.rank in profile.ranks else None
        problem = claim_dirs(self.cfg.run.dir, self.ckpt.dir, profiled, self.is_main, self.locks)
        raise_first_problem(problem, self.world)

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

    @property
    def resume_path(self) -> Optional[str]:
        """The checkpoint this run resumes from, or None."""
        return os.path.join(*self.source) if self.source else None

    @property
    def resume_step(self) -> int:
        """The step of the checkpoint this run resumes from, by its tag (0: none, or a tag not ours)."""
        return (tag_step(self.source[1]) or 0) if self.source else 0

    @property
    def stateful(self) -> dict:
        """The parts a checkpoint restores, by their name in its client state."""
        return {"train_state": self.state, "data_loader": self.loader}

    def restore(self) -> None:
        """Load the checkpoint build() chose into the engine and the stateful parts."""
        if self.source is None:
            if self.is_main:
                print(fresh_start_line(self.cfg.train.resume, self.ckpt.dir), flush=True)
            return
        path, client = load_checkpoint(
            self.ckpt, self.engine, self.source, self.plan, self.stateful, self.cfg.train.seed, self.resolved["model"]
        )
        self.last_checkpoint = path
        if self.is_main:
            for line in resumed_lines(path, self.state, self.plan.notes, client.get("config"), self.resolved):
                print(line, flush=True)
            if self.loader.switched:
                print(self.loader.switched, flush=True)

    def _open_outputs(self) -> None:
        """Run dir, console banner, metrics, profiler and progress bar."""
        cfg, run_dir = self.cfg, self.cfg.run.dir
        resumed_from = self.source[0] if self.source else None  # the resumed checkpoint's directory
        problem = None
        try:  # rank 0's files and W&B; the profiler checks profile.ranks on every rank
            if self.is_main:
                open_run_dir(run_dir, self.ckpt.dir, resumed_from, self.resolved, self.state.step)
                print(self._banner(), flush=True)
            # every rank has a logger; only rank 0's writes metrics.jsonl and W&B
            # a run started from another run's checkpoint is a W&B run of its own, as it has its own metrics
            own = continues_run(self.ckpt.dir, resumed_from)
            self.logger = MetricsLogger(
                run_dir, self.is_main, cfg.wandb, self.resolved, self.state.wandb_id if own else None
            )
            self.state.wandb_id = self.logger.wandb_id
            self.profiler = Profiler(
                profile_dir(run_dir, self.rank),
                self.rank,
                self.world,
                self.device.type,
                self.state.step,
                **asdict(cfg.profile),
            )
        except (ValueError, OSError) as e:
            problem = str(e)
        raise_first_problem(problem, self.world)
        cp = self.world // self.dp_world  # context parallel: retention counted in the form each rank runs
        self.flops = flops_per_token(self.model_cfg, cfg.data.seq_len, self.device, cp)["model"]
        self.peak = device_peak_flops(self.device, cfg.train.peak_flops)
        self.throughput = Throughput(self.state.tokens_seen)
        self.bar = progress_bar(cfg.train.max_steps, self.state.step, self.is_main)

    def _banner(self) -> str:
        params = self.model.num_params()
        done = (self.state.step, self.state.tokens_seen)
        return start_banner(
            self.cfg, self.world, self.dp_world, self.accum, self.tokens_per_step, params, self.device.type, done
        )

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict:
        """Train to train.max_steps (or a stop signal); returns a summary of the run."""
        self.preempt = PreemptionHandler()  # takes over a signal the entry point's handler recorded
        failed = True  # until the steps are done: an error (or Ctrl-C) ends the run as failed
        try:
            preempted = self._start()
            if not preempted:
                stats = self._run_steps()
                preempted = bool(stats) and self._preempted(stats)
            failed = False
        except torch.cuda.OutOfMemoryError as e:
            raise TrainingError(f"{OOM_HINT}\n{e}") from e
        except OSError as e:  # a file the run reads or writes: disk full, permissions, a mount gone
            last = self.last_checkpoint or self.resume_path  # (the one loading, if any)
            raise io_failure(e, self.state.step if self.started else None, last) from e
        finally:
            self.close(failed)
        if self.is_main and not preempted:
            print(done_line(self.state.step, self.logger.path, self.last_checkpoint), flush=True)
        return {
            "step": self.state.step,
            "loss": self.last_loss,
            "checkpoint": self.last_checkpoint,
            "skipped_steps": self.state.faults.total,
            "tokens_seen": self.state.tokens_seen,
            "preempted": preempted,
        }

    def _start(self) -> bool:
        """build(), restore() and the outputs; True when a stop signal came first: the run then stops
        after the build or after loading its checkpoint, before it writes anything."""
        self.build()
        if self._stop_before_training():
            return True
        self.restore()  # a signal while loading: the load finishes, then the run stops
        if self._stop_before_training():
            return True
        self._open_outputs()
        self.started = True
        return False

    def _stop_before_training(self) -> bool:
        """A stop signal on some rank before the first step, with steps left to train: nothing was trained,
        so nothing is saved (the same command starts again where this one would have)."""
        if max(self.state.step, self.resume_step) >= self.cfg.train.max_steps:
            return False  # nothing to train: the run finishes (before restore(), its checkpoint's tag says so)
        if not any_rank(bool(self.preempt.received), self.device):
            return False
        if self.is_main:
            print(self.preempt.not_started_note(self.resume_path), flush=True)
        return True

    def _run_steps(self) -> Optional[StepStats]:
        """Steps and their policies up to train.max_steps or a stop signal; the last step's stats."""
        max_steps, stats = self.cfg.train.max_steps, None
        if self.state.step >= max_steps and self.is_main:
            print(nothing_to_train_line(self.state.step, max_steps), flush=True)
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
        return stats

    def train_step(self) -> StepStats:
        """accumulation micro-batches, one optimizer step, one all-reduce of what every rank saw."""
        cfg, engine = self.cfg.train, self.engine
        # read before the step: DeepSpeed advances the schedule inside the last engine.step(), after
        # which get_last_lr() is the next step's rate
        lr = self.scheduler.get_last_lr()[0]
        losses = []
        for _ in range(self.accum):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in next(self.loader).items()}
            batch = self.cp.shard_batch(batch) if self.cp else batch  # this rank's seq_len / P tokens of each row
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
        loss_bad, update_skipped, loss_sum, stop = all_reduce_step(
            losses, engine.was_step_applied(), bool(self.preempt.received), self.device
        )
        skipped = self.state.faults.update(loss_bad, update_skipped)
        if not skipped:
            self.last_loss = loss_sum / self.world
        return StepStats(self.state.step, lr, None if skipped else self.last_loss, loss_bad, skipped, stop)

    # ------------------------------------------------------------------ policies

    def maybe_log(self, stats: StepStats) -> None:
        """Every train.log_interval steps, the last step and every skipped step; notes: a skip, sources read through."""
        train = self.cfg.train
        if not (stats.step % train.log_interval == 0 or stats.step == train.max_steps or stats.skipped):
            return
        tps = self.throughput.rate(self.state.tokens_seen)
        self.logger.log(
            {
                "step": stats.step,
                "loss": stats.loss,
                "lr": stats.lr,
                "grad_norm": global_grad_norm(self.engine),
                "tokens_per_s": tps,
                "mfu": mfu(tps, self.flops, self.peak, self.world),
                "peak_mem_gib": peak_memory_gib(self.device),
                "tokens_seen": self.state.tokens_seen,
                "skipped_steps": self.state.faults.total,
            }
        )
        if self.is_main:
            notes = [self.state.faults.skip_note(stats.step, stats.loss_nonfinite)] if stats.skipped else []
            for note in notes + [f"step {stats.step} | {n}" for n in self.loader.epoch_notes()]:
                self.logger.write(note)

    def stop_on_faults(self) -> None:
        """Too many non-finite steps in a row: save the last good weights and stop with an error."""
        if self.state.faults.should_stop:
            path = self.save()  # skipped steps left the weights as the last good step made them
            raise self.state.faults.stop_error(self.state.step, path)

    def maybe_evaluate(self) -> Optional[float]:
        """Validation loss every train.eval_interval steps and at the last step (0: never)."""
        step, cfg = self.state.step, self.cfg.train
        if not evaluation_due(step, cfg.eval_interval, cfg.max_steps):
            return None
        with self.throughput.paused():
            # the whole pass: build_loaders capped it at train.eval_batches batches' worth of sequences
            loader = self.val_loader
            result = mean_loss(
                self.engine, loader, self.device, cp=self.cp, sum_over_ranks=True, sources=loader.batch_sources
            )
        self.logger.log(validation_metrics(step, result))
        return result.loss

    def maybe_save(self, stats: StepStats) -> Optional[str]:
        """Every checkpoint.interval steps, at a stop signal, and at the end (checkpoint.save_at_end)."""
        step, cfg = self.state.step, self.cfg.checkpoint
        final = step == self.cfg.train.max_steps and cfg.save_at_end
        if not (step % cfg.interval == 0 or stats.stop_requested or final):
            return None
        with self.throughput.paused():
            path = self.save()
        if self._preempted(stats) and self.is_main:
            self.logger.write(self.preempt.saved_note(path, step))
        return path

    def _preempted(self, stats: StepStats) -> bool:
        """Stopped by a signal with steps left to train. A signal during the last step leaves nothing to
        resume: the run is finished (exit 0), not 75, on which the SLURM scripts would requeue it."""
        return stats.stop_requested and self.state.step < self.cfg.train.max_steps

    def save(self) -> str:
        client = client_state(
            self.stateful,
            config=self.resolved,
            layout=self.layout,
            # how prompts must start at inference to look like a training document's start
            documents_start_with_bos=self.loader.documents_start_with_bos,
            tokenizer=self.tokenizer,
        )
        self.last_checkpoint = self.ckpt.save(self.engine, self.state.step, client)
        return self.last_checkpoint

    def close(self, failed: bool = False) -> None:
        """Write what is open (a profiled window cut short, metrics; failed: W&B's run ends as failed) and
        give back the signal handlers."""
        if self.profiler is not None:
            self.profiler.close()
        if self.bar is not None:
            self.bar.close()
        if self.preempt is not None:
            self.preempt.restore()
        if self.logger is not None:
            self.logger.close(failed)
        for lock in reversed(self.locks):
            lock.release()
        self.locks = []
