"""Restoring a run from the checkpoint checkpoint.resolve_resume chose: DeepSpeed's state into the
engine, each stateful part from the client state, and the console lines that say what was resumed
(or why its weights do not fit this model)."""

from __future__ import annotations

import os
from typing import Mapping, Optional, Tuple

import torch

from .checkpoint import CheckpointManager, Stateful, load_parts
from .checkpoint_discovery import model_states_file
from .config import config_diff
from .train_state import TrainState


def load_checkpoint(
    manager: CheckpointManager,
    engine,
    source: Tuple[str, str],
    plan,
    parts: Mapping[str, Stateful],
    reseed: int,
    model_config: dict,
) -> Tuple[str, dict]:
    """Load `source` (directory, tag) into `engine` and `parts`; returns the checkpoint's path and its
    client state. plan: components.reshard.ResumePlan; model_config: this run's resolved model.*."""
    directory, tag = source
    path = os.path.join(directory, tag)
    try:
        client = manager.load(engine, tag, directory=directory, plan=plan, reseed=reseed)
    except RuntimeError as e:  # torch's load_state_dict: the weights do not fit this model
        raise ValueError(misfit(path, e, model_config)) from None
    load_parts(client, parts, path)
    return path, client


def misfit(path: str, error: RuntimeError, model_config: dict) -> str:
    """One line on a checkpoint whose weights do not load: torch's first complaint and the model.*
    settings that differ from the checkpoint's."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = (lines[1] if len(lines) > 1 else lines[0] if lines else type(error).__name__)[:300]
    saved = torch.load(model_states_file(path), map_location="cpu", weights_only=False, mmap=True)
    changed = config_diff((saved.get("config") or {}).get("model") or {}, model_config, "model.")
    return f"train.resume: {path} does not load into this model ({detail})" + (
        f"; model settings differ from the checkpoint's: {'; '.join(changed)}" if changed else ""
    )


def fresh_start_line(resume: str, checkpoint_dir: str) -> str:
    return f"no checkpoint in {checkpoint_dir}: starting fresh" if resume == "auto" else "starting fresh"


def nothing_to_train_line(step: int, max_steps: int) -> str:
    return (
        f"already at step {step} >= train.max_steps={max_steps}: nothing to train. "
        f"Raise train.max_steps to continue this run, or use a new run.dir to start another"
    )


def resumed_lines(path: str, state: TrainState, notes: list, saved_config: Optional[dict], resolved: dict) -> list:
    """Where the run resumed (notes: how the checkpoint was converted, if it was) and which settings
    changed since that checkpoint was saved (saved_config: its resolved config)."""
    converted = f" ({', '.join(notes)})" if notes else ""
    lines = [f"resumed from {path} at step {state.step} ({state.tokens_seen:,} tokens seen){converted}"]
    changed = config_diff(saved_config or {}, resolved)
    if changed:
        lines.append("config changed since that checkpoint: " + "; ".join(changed))
    return lines
