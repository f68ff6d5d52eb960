"""A DeepSpeed checkpoint as inference reads it: which tag (components/checkpoint_discovery answers for
the trainer's layout), the model states and the full weights at any ZeRO stage and world size."""
from __future__ import annotations

import contextlib
import glob
import os
import sys
from typing import Optional

import torch

from ..components import checkpoint_discovery as discovery
from .errors import CheckpointError


def _incomplete(tag_dir: str) -> CheckpointError:
    return CheckpointError(f"{tag_dir}: incomplete checkpoint (no {discovery.COMPLETE} marker: the save was interrupted)")


def _has_model_states(directory: str) -> bool:
    return bool(glob.glob(os.path.join(directory, "*_model_states.pt")))


def resolve_deepspeed_dir(path: str, tag: Optional[str] = None) -> tuple:
    """(save_dir, tag) for a run dir (holding checkpoints/), a save dir with `latest`, a tag dir, or a save
    dir plus tag. In the trainer's layout (tags marked COMPLETE) only complete tags count."""
    path = os.path.abspath(path)
    if tag is None and not os.path.isfile(os.path.join(path, discovery.LATEST)) \
            and os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")  # a run dir
    if tag is None and _has_model_states(path):
        path, tag = os.path.split(path)  # a tag dir
    trainer_made = bool(glob.glob(os.path.join(path, "*", discovery.COMPLETE)))
    if tag is None:
        tag = discovery.latest_valid(path) if trainer_made else discovery.read_latest(path)
        if tag is None:
            raise CheckpointError(f"{path}: not an exported model (config.json + model.safetensors) nor a DeepSpeed "
                                  "checkpoint (no 'latest' file and no *_model_states.pt)")
    elif trainer_made and not discovery.is_complete(path, tag):
        raise _incomplete(os.path.join(path, tag))
    if not _has_model_states(os.path.join(path, tag)):
        raise CheckpointError(f"{os.path.join(path, tag)}: no *_model_states.pt (missing or incomplete checkpoint "
                              f"tag {tag!r})")
    return path, tag


def read_model_states(tag_dir: str) -> dict:
    """Rank 0's model-states dict (client state, DeepSpeed's counters; weights memory-mapped)."""
    return torch.load(discovery.model_states_file(tag_dir), map_location="cpu", weights_only=False, mmap=True)


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
        with contextlib.redirect_stdout(sys.stderr):
            return get_fp32_state_dict_from_zero_checkpoint(save_dir, tag=tag)
    module = read_model_states(tag_dir).get("module")
    if not module:
        raise CheckpointError(f"{tag_dir}: no ZeRO optimizer shards and no 'module' weights in the model states")
    return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
