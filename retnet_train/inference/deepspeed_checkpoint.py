"""A DeepSpeed checkpoint as inference reads it: which tag (components/checkpoint_discovery answers for
the trainer's layout), the model states and the full weights at any ZeRO stage and world size."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import sys
from typing import Optional

import torch

from ..components import checkpoint_discovery as discovery
from .errors import CheckpointError


def resolve_deepspeed_dir(path: str, tag: Optional[str] = None) -> discovery.Choice:
    """The checkpoint to read for a run dir (holding checkpoints/), a save dir, a tag dir, or a save or
    run dir plus tag. Only valid checkpoints (checkpoint_discovery) are read: one named explicitly must
    be valid; in a directory the newest valid one is taken (Choice.note names what was skipped)."""
    path = os.path.abspath(path)
    if tag is not None:
        path = _tag_dir(path, tag)
    if tag is not None or discovery.is_tag_dir(path):
        directory, name = os.path.split(path)
        why = discovery.damage(directory, name)
        if why:
            raise CheckpointError(f"{path}: {why}")
        return discovery.Choice(directory, name)
    choice = discovery.find_checkpoint(path)
    if choice.tag is not None:
        return choice
    if not choice.skipped and os.path.isfile(os.path.join(path, "config.yaml")):  # the trainer's run dir
        raise CheckpointError(f"{path}: a run directory with no checkpoint saved yet (checkpoints/ holds none)")
    if not choice.skipped:
        raise CheckpointError(
            f"{path}: not an exported model (config.json + model.safetensors) nor a checkpoint "
            f"directory (no step_N checkpoints, no '{discovery.LATEST}' file)"
        )
    raise CheckpointError(f"{choice.directory}: no usable checkpoint ({choice.reasons()})")


def tag_names(tag: str) -> list:
    """The directory names `tag` may mean: itself, and for a step number (step_200, 200) the trainer's
    tag of that step (step_00000200), which the docs and users write as step_N."""
    step = re.fullmatch(r"(?:step_)?(\d+)", tag)
    return [tag] + ([discovery.tag_for(int(step.group(1)))] if step else [])


def _tag_dir(path: str, tag: str) -> str:
    """<path>/<tag>, or <path>/checkpoints/<tag> for a run dir (tag as tag_names reads it). An unknown tag
    (a typo) is refused naming the directory that holds the checkpoints and their tags."""
    run_checkpoints = os.path.join(path, "checkpoints")
    for directory in (path, run_checkpoints):
        for name in tag_names(tag):
            if os.path.isdir(os.path.join(directory, name)):
                return os.path.join(directory, name)
    if discovery.TAG_RE.match(os.path.basename(path)):
        raise CheckpointError(
            f"--tag {tag}: {path} is one checkpoint; with --tag, name the directory that holds the checkpoints "
            f"({os.path.dirname(path)}) or the run"
        )
    holder = run_checkpoints if not discovery.checkpoint_tags(path) and os.path.isdir(run_checkpoints) else path
    held = discovery.checkpoint_tags(holder)
    latest = discovery.read_latest(holder)  # DeepSpeed's own tags (global_stepN) are named there
    held += [latest] if latest and latest not in held else []
    raise CheckpointError(f"--tag {tag}: no checkpoint {tag} in {holder} (it holds {', '.join(held) or 'nothing'})")


def read_model_states(tag_dir: str) -> dict:
    """Rank 0's model-states dict (client state, DeepSpeed's counters; weights memory-mapped)."""
    path = discovery.model_states_file(tag_dir)
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # torch raises several types for a damaged file; the one-line error names it
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None


def _has_zero_optimizer_shards(tag_dir: str) -> bool:
    files = glob.glob(os.path.join(tag_dir, "*_optim_states.pt"))
    return any(os.path.basename(f).startswith(("zero_pp_rank_", "bf16_zero_pp_rank_")) for f in files)


def consolidated_state_dict(save_dir: str, tag: str) -> dict:
    """Full fp32 weights of a DeepSpeed checkpoint, any ZeRO stage and world size: DeepSpeed's own
    zero_to_fp32 for ZeRO shards; a stage-0 checkpoint's `module` entry holds the full weights."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = os.path.join(save_dir, tag)
    if _has_zero_optimizer_shards(tag_dir):
        # zero_to_fp32 reports progress with print(): keep stdout for our results (JSON, text)
        try:
            with contextlib.redirect_stdout(sys.stderr):
                return get_fp32_state_dict_from_zero_checkpoint(save_dir, tag=tag)
        except Exception as e:  # a damaged shard the cheap checks let through
            raise CheckpointError(
                f"{tag_dir}: DeepSpeed cannot consolidate its ZeRO shards ({type(e).__name__}: {e})"
            ) from None
    module = read_model_states(tag_dir).get("module")
    if not module:
        raise CheckpointError(f"{tag_dir}: no ZeRO optimizer shards and no 'module' weights in the model states")
    return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
