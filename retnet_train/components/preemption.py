"""SIGTERM / SIGUSR1 (cluster preemption) ask for a checkpoint and a clean exit at the next step
boundary; all ranks agree through the step's one all-reduce (Trainer.train_step), which carries
`received` with the loss.

The entry point installs a handler before anything slow (imports, the build, checkpoint loading), so
that an early signal is recorded instead of killing the process; the trainer's handler, installed over
it, takes over what it recorded and acts on it at its first safe point."""

from __future__ import annotations

import signal
from typing import Optional


class PreemptionHandler:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: Optional[str] = None
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        earlier = self._received_before()
        if earlier and not self.received:  # a signal to this handler since it was installed is kept
            self.received = earlier

    def _received_before(self) -> Optional[str]:
        """What a PreemptionHandler this one replaced has recorded (the entry point's, before the trainer's)."""
        for handler in self._previous.values():
            earlier = getattr(handler, "__self__", None)
            if isinstance(earlier, PreemptionHandler) and earlier.received:
                return earlier.received
        return None

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def saved_note(self, path: str, step: int) -> str:
        """The console line after the checkpoint a signal asked for (on this rank or another)."""
        return (
            f"{self.received or 'signal on another rank'}: checkpoint saved to {path} "
            f"at step {step}; exiting (resume with the same command)"
        )

    def not_started_note(self, resume_from: Optional[str]) -> str:
        """The console line when a signal came before the first step: nothing was trained, so nothing is saved."""
        where = f"from {resume_from}" if resume_from else "fresh"
        return (
            f"{self.received or 'signal on another rank'} before training started: nothing saved; "
            f"exiting (the same command starts again {where})"
        )

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
