"""Fault handling: non-finite steps (skipped, counted, a stop after too many in a row), the
out-of-memory hint, and fault injection for tests."""

from __future__ import annotations

from typing import Optional

import torch

from .rank_errors import SharedError

OOM_HINT = (
    "out of GPU memory: lower train.micro_batch_size (raising accumulation), set "
    "train.activation_checkpointing=full, raise deepspeed.zero_stage, or enable "
    "deepspeed.offload_optimizer / deepspeed.offload_param (ZeRO-3)"
)


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and what was saved."""


class SharedTrainingError(SharedError, TrainingError):
    """A TrainingError every rank raises with the same message (printed once, by rank 0)."""


def io_failure(error: OSError, step: Optional[int], last_checkpoint: Optional[str]) -> TrainingError:
    """A file the run reads or writes failed (disk full, permissions, a mount gone) at `step` (None:
    while the run was built or its checkpoint loaded): what and where, and the checkpoint to resume from.
    Shared by every rank where the error is (a save that failed on some ranks: checkpoint.SaveFailed)."""
    where = f" at step {step}" if step is not None else " at start"
    return (SharedTrainingError if isinstance(error, SharedError) else TrainingError)(
        f"{error.filename or 'I/O'}: {error.strerror or error}{where}; the last checkpoint is "
        f"{last_checkpoint or 'none'}"
    )


class NonFiniteTracker:
    """Counts skipped steps. A step is skipped when any rank saw a non-finite loss or the optimizer
    found a non-finite gradient norm (DeepSpeed's overflow check; GuardedAdamW on fp32 ZeRO-0);
    every rank takes the same decision from one all-reduce. Under fp16 the loss scaler skips
    overflowing steps routinely: those count as skipped, but only a non-finite loss counts
    towards the stop after `max_consecutive` in a row."""

    def __init__(self, max_consecutive: int, scaler_skips_are_normal: bool = False):
        self.max_consecutive = max_consecutive
        self.scaler_skips_are_normal = scaler_skips_are_normal
        self.consecutive = 0
        self.total = 0

    def update(self, loss_nonfinite: bool, update_skipped: bool) -> bool:
        """Record one step; returns whether it was skipped."""
        skipped = loss_nonfinite or update_skipped
        if skipped:
            self.total += 1
        if loss_nonfinite or (skipped and not self.scaler_skips_are_normal):
            self.consecutive += 1
        else:
            self.consecutive = 0
        return skipped

    @property
    def should_stop(self) -> bool:
        return self.consecutive >= self.max_consecutive

    def skip_note(self, step: int, loss_nonfinite: bool) -> str:
        """The console line for skipped step `step`."""
        why = "non-finite loss" if loss_nonfinite else "non-finite gradient norm"
        return f"step {step} skipped ({why}): no update; {self.consecutive} in a row, {self.total} in total"

    def stop_error(self, step: int, saved: str) -> TrainingError:
        """The error that ends a run at `step` after too many non-finite steps in a row, the weights of
        the last good step saved in `saved`."""
        return TrainingError(
            f"{self.consecutive} consecutive steps with non-finite loss or gradients "
            f"(train.max_consecutive_nonfinite={self.max_consecutive}); stopped. The weights of "
            f"the last good step ({step - self.consecutive}) are saved in {saved}"
        )

    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.consecutive, self.total = int(state["consecutive"]), int(state["total"])


class _InfGrad(torch.autograd.Function):
    """Identity forward; backward returns an infinite gradient (a finite loss with bad gradients)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def inject(loss: torch.Tensor, step: int, loss_at, grad_at) -> torch.Tensor:
    """Fault injection for tests (train.inject_nonfinite_at / inject_nonfinite_grad_at): `step` is
    the 1-based step being computed."""
    if step in loss_at:
        loss = loss * float("nan")
    if step in grad_at:
        loss = _InfGrad.apply(loss)
    return loss
