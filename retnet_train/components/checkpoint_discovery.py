"""Which checkpoint is the newest valid one: the one answer used by resuming (components/checkpoint.py)
and by the inference loaders (inference/deepspeed_checkpoint.py).

The trainer writes <dir>/step_<N>/ (every rank's DeepSpeed files and RNG states), then
<dir>/step_<N>/COMPLETE once all ranks finished, then <dir>/latest (the tag). Only a tag dir with
COMPLETE is a checkpoint; `latest` is taken when it names one, else the newest complete tag.
"""
from __future__ import annotations

import glob
import os
import re
from typing import Optional

COMPLETE = "COMPLETE"
LATEST = "latest"
TAG_RE = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(directory: str, tag: str) -> bool:
    return os.path.isfile(os.path.join(directory, tag, COMPLETE))


def checkpoint_tags(directory: str) -> list:
    """Every step_<N> dir in `directory`, complete or not, oldest first."""
    if not os.path.isdir(directory):
        return []
    return sorted((t for t in os.listdir(directory) if TAG_RE.match(t)), key=lambda t: int(TAG_RE.match(t).group(1)))


def complete_tags(directory: str) -> list:
    return [t for t in checkpoint_tags(directory) if is_complete(directory, t)]


def read_latest(directory: str) -> Optional[str]:
    """The tag `latest` names, or None without one."""
    pointer = os.path.join(directory, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        return f.read().strip() or None


def latest_valid(directory: str) -> Optional[str]:
    """The `latest` tag if complete, else the newest complete tag (a save killed midway); None: none."""
    tag = read_latest(directory)
    if tag is not None and is_complete(directory, tag):
        return tag
    tags = complete_tags(directory)
    return tags[-1] if tags else None


def find_checkpoint(path: str) -> Optional[tuple]:
    """(directory, tag) of the checkpoint `path` names: one checkpoint (<dir>/step_N with COMPLETE), a
    directory of checkpoints (its latest valid one), or a run dir holding checkpoints/; None: none there."""
    path = os.path.abspath(path.rstrip("/") or "/")
    if os.path.isfile(os.path.join(path, COMPLETE)):
        return os.path.split(path)
    for candidate in (path, os.path.join(path, "checkpoints")):
        tag = latest_valid(candidate)
        if tag:
            return candidate, tag
    return None


def model_states_file(tag_dir: str) -> str:
    """DeepSpeed's model-states file of rank 0 in a checkpoint tag dir (any ZeRO stage)."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if os.path.isfile(os.path.join(tag_dir, name)):
            return os.path.join(tag_dir, name)
    found = sorted(glob.glob(os.path.join(tag_dir, "*_model_states.pt")))
    if not found:
        raise FileNotFoundError(f"{tag_dir}: no *_model_states.pt (not a DeepSpeed checkpoint, or an incomplete one)")
    return found[0]
