"""SIGTERM / SIGUSR1 (cluster preemption) ask for a checkpoint and a clean exit at the next step
boundary; all ranks agree through the step's one all-reduce (Trainer.train_step), which carries
`received` with the loss."""

from __future__ import annotations

import signal


class PreemptionHandler:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received = None
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def saved_note(self, path: str, step: int) -> str:
        """The console line after the checkpoint a signal asked for (on this rank or another)."""
        return (
            f"{self.received or 'signal on another rank'}: checkpoint saved to {path} "
            f"at step {step}; exiting (resume with the same command)"
        )

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
