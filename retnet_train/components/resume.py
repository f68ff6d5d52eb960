"""Restoring a run from the checkpoint resume_source.resolve_resume chose: DeepSpeed's state into the
engine, each stateful part from the client state, and the console lines that say what was resumed
(or why its weights do not fit this model) and, at the end, which checkpoint the run leaves."""

from __future__ import annotations

import os
from typing import Mapping, Optional, Tuple

from omegaconf import OmegaConf

from .checkpoint import CheckpointManager, Stateful, load_parts
from .checkpoint_discovery import read_model_states, tag_for
from .config import TrainConfig
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
    configured = configured_optim(engine)
    try:
        client = manager.load(engine, tag, directory=directory, plan=plan, reseed=reseed)
    except RuntimeError as e:  # torch's load_state_dict: the weights do not fit this model
        raise ValueError(misfit(path, e, model_config)) from None
    restore_configured_optim(engine, configured)
    load_parts(client, parts, path)
    return path, client


OPTIM_KEYS = ("weight_decay", "betas", "eps")  # optim.* kept in the optimizer's param groups


def configured_optim(engine) -> Optional[tuple]:
    """(peak lr per group, optim.* hyperparameters per group) as this run's config built them, before a
    checkpoint's optimizer and scheduler state replace them; None without an LR scheduler."""
    scheduler = getattr(engine, "lr_scheduler", None)
    if not hasattr(scheduler, "lr_lambdas"):  # none, or not the LambdaLR of components/optim.py
        return None
    groups = [{k: group[k] for k in OPTIM_KEYS if k in group} for group in scheduler.optimizer.param_groups]
    return list(scheduler.base_lrs), groups


def restore_configured_optim(engine, configured: Optional[tuple]) -> None:
    """Loading a checkpoint restores the optimizer's param groups and the scheduler's peak lr as saved, so a
    resumed run would keep the old optim.lr, weight_decay, betas and eps while the schedule's other keys
    (warmup_steps, decay, max_steps) follow the config: put this run's back and recompute the lr of the
    next step. Unchanged settings give the saved values bit for bit (the scheduler computes them alike)."""
    if configured is None:
        return
    base_lrs, groups = configured
    scheduler = engine.lr_scheduler
    param_groups = scheduler.optimizer.param_groups
    if len(param_groups) != len(groups) or len(scheduler.lr_lambdas) != len(base_lrs):
        return  # load_state_dict refuses another number of groups before this
    scheduler.base_lrs = list(base_lrs)
    for group, values, base_lr, lr_lambda in zip(param_groups, groups, base_lrs, scheduler.lr_lambdas):
        group.update(values)
        group["initial_lr"] = base_lr
        group["lr"] = base_lr * lr_lambda(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in param_groups]  # what get_last_lr() reports


def misfit(path: str, error: RuntimeError, model_config: dict) -> str:
    """One line on a checkpoint whose weights do not load: torch's first complaint and the model.*
    settings that differ from the checkpoint's."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = (lines[1] if len(lines) > 1 else lines[0] if lines else type(error).__name__)[:300]
    saved = read_model_states(path)
    changed = config_diff((saved.get("config") or {}).get("model") or {}, model_config, "model.")
    return f"train.resume: {path} does not load into this model ({detail})" + (
        f"; model settings differ from the checkpoint's: {'; '.join(changed)}" if changed else ""
    )


ABSENT = "<absent>"


def config_diff(old: dict, new: dict, prefix: str = "", defaults: Optional[dict] = None) -> list:
    """'key: old -> new' for every leaf that differs between two resolved configs (nested dicts).
    defaults (the schema's, nested alike): a key that `old` lacks, because it was saved before the key
    existed, is no change while `new` holds its default."""
    out, defaults = [], defaults or {}
    for key in sorted(set(old) | set(new)):
        a, b, name = old.get(key, ABSENT), new.get(key, ABSENT), f"{prefix}{key}"
        if isinstance(b, dict) and (isinstance(a, dict) or a == ABSENT):
            default = defaults.get(key)
            out += config_diff(a if a != ABSENT else {}, b, name + ".", default if isinstance(default, dict) else None)
        elif a != b and not (a == ABSENT and key in defaults and defaults[key] == b):
            out.append(f"{name}: {a} -> {b}")
    return out


def fresh_start_line(resume: str, checkpoint_dir: str) -> str:
    return f"no whole checkpoint in {checkpoint_dir}: starting fresh" if resume == "auto" else "starting fresh"


def nothing_to_train_line(step: int, max_steps: int) -> str:
    return (
        f"already at step {step} >= train.max_steps={max_steps}: nothing to train. "
        f"Raise train.max_steps to continue this run, or use a new run.dir to start another"
    )


def done_line(step: int, metrics_path: str, checkpoint: Optional[str]) -> str:
    """The finished run's last line. checkpoint: the last one saved or loaded; not of this step when
    checkpoint.save_at_end=false."""
    done = f"done at step {step}: metrics in {metrics_path}, "
    if checkpoint is None:
        return done + "no checkpoint saved (checkpoint.save_at_end=false)"
    if os.path.basename(os.path.normpath(checkpoint)) != tag_for(step):
        return done + f"no checkpoint of step {step} (checkpoint.save_at_end=false); the last one is {checkpoint}"
    return done + f"checkpoint in {checkpoint}"


def resumed_lines(path: str, state: TrainState, notes: list, saved_config: Optional[dict], resolved: dict) -> list:
    """Where the run resumed (notes: how the checkpoint was converted, if it was) and which settings
    changed since that checkpoint was saved (saved_config: its resolved config)."""
    converted = f" ({', '.join(notes)})" if notes else ""
    lines = [f"resumed from {path} at step {state.step} ({state.tokens_seen:,} tokens seen){converted}"]
    schema = OmegaConf.to_container(OmegaConf.structured(TrainConfig()), resolve=True)
    changed = config_diff(saved_config or {}, resolved, defaults=schema)
    if changed:
        lines.append("config changed since that checkpoint: " + "; ".join(changed))
    return lines
