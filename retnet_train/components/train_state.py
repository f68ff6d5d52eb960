"""What a run has done so far: the trainer's own part of a checkpoint (torchtitan's TrainState)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from .faults import NonFiniteTracker


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    tokens_seen: int = 0  # training tokens consumed by all ranks together
    wandb_id: Optional[str] = None  # the W&B run a resumed run continues
    faults: NonFiniteTracker = field(default_factory=lambda: NonFiniteTracker(1))  # skipped-step counters

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "wandb_id": self.wandb_id,
            "faults": self.faults.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.wandb_id = state.get("wandb_id")
        if state.get("faults") is not None:  # absent in checkpoints written before faults were counted
            self.faults.load_state_dict(state["faults"])
