"""The Trainer: builds a run from its typed config, restores it from a checkpoint (both in trainer_setup.py),
and steps it.

    trainer = Trainer(cfg)
    summary = trainer.train()   # build(), restore(), then train_step() and the log / evaluate / save policies

Everything the checkpoint restores is a stateful part (`state`: TrainState, `loader`: TokenLoader),
saved as one dict beside DeepSpeed's state (components/checkpoint.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .components.checkpoint import client_state
from .components.config import TrainConfig, check_values
from .components.distributed import all_reduce_step, any_rank
from .components.faults import OOM_HINT, TrainingError, inject, io_failure
from .components.metrics import mfu, peak_memory_gib
from .components.optim import global_grad_norm
from .components.preemption import PreemptionHandler
from .components.resume import done_line, nothing_to_train_line
from .components.validation import evaluation_due, mean_loss, validation_metrics
from .trainer_setup import TrainerSetup


@dataclass
class StepStats:
    """One optimizer step, as every rank agreed on it (one all-reduce)."""

    step: int
    lr: float  # the learning rate this step's update used (or would have used, when skipped)
    loss: Optional[float]  # mean over ranks and micro-batches; None when the step was skipped
    loss_nonfinite: bool  # some rank saw a non-finite loss
    skipped: bool  # no update: non-finite loss or gradient norm
    stop_requested: bool  # some rank got SIGTERM / SIGUSR1


class Trainer(TrainerSetup):
    def __init__(self, cfg: TrainConfig):
        check_values(cfg)
        self.cfg = cfg
        self.profiler = self.bar = self.preempt = self.logger = None
        self.locks: list = []
        self.last_checkpoint: Optional[str] = None
        self.source: Optional[tuple] = None  # (directory, tag) of the checkpoint to resume, once built
        self.last_loss = float("nan")
        self.started = False  # built, restored, outputs open: a failure from here on is at a step

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
