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

read_model_states = discovery.read_model_states  # shared with resuming: one wording for a damaged file


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


def _first_damaged_file(tag_dir: str) -> Optional[str]:
    """'<file>: why' of the first torch file in tag_dir that shows damage (None: none does)."""
    for path in sorted(glob.glob(os.path.join(tag_dir, "*.pt"))):
        why = discovery.unreadable_torch_file(path)
        if why:
            return f"{path}: {why}"
    return None


def _has_zero_optimizer_shards(tag_dir: str) -> bool:
    files = glob.glob(os.path.join(tag_dir, "*_optim_states.pt"))
    return any(os.path.basename(f).startswith(("zero_pp_rank_", "bf16_zero_pp_rank_")) for f in files)


def consolidated_state_dict(save_dir: str, tag: str) -> dict:
    """Full fp32 weights of a DeepSpeed checkpoint, any ZeRO stage and world size: DeepSpeed's own
    zero_to_fp32 for ZeRO shards; a stage-0 checkpoint's `module` entry holds the full weights, in bf16 / fp16
    the rounding of the fp32 masters in its optimizer state, which are taken instead (zero0_fp32_masters)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = os.path.join(save_dir, tag)
    if _has_zero_optimizer_shards(tag_dir):
        # zero_to_fp32 reports progress with print(): keep stdout for our results (JSON, text)
        try:
            with contextlib.redirect_stdout(sys.stderr):
                return get_fp32_state_dict_from_zero_checkpoint(save_dir, tag=tag)
        except Exception as e:  # a damaged shard the cheap checks let through
            damaged = _first_damaged_file(tag_dir)
            raise CheckpointError(
                damaged or f"{tag_dir}: DeepSpeed cannot consolidate its ZeRO shards ({type(e).__name__}: {e})"
            ) from e
    state = read_model_states(tag_dir)
    module = state.get("module")
    if not module:
        raise CheckpointError(f"{tag_dir}: no ZeRO optimizer shards and no 'module' weights in the model states")
    masters = zero0_fp32_masters(state, discovery.model_states_file(tag_dir))
    return {k: masters[k] if k in masters else v.float() if v.is_floating_point() else v for k, v in module.items()}


class _NamedParameters:
    """What optim.param_groups reads of a model (named_parameters), for the parameters a checkpoint names."""

    def __init__(self, named: list):
        self.named = named

    def named_parameters(self):
        return iter(self.named)


def _master_orders(module: dict, state: dict) -> tuple:
    """(parameter names with the names tied to each, candidate orders of the optimizer's fp32 masters):
    the trainer's weight-decay groups (optim.param_groups), else one group of every parameter."""
    from ..components.optim import param_groups

    buffers, first_at, aliases = set(state.get("buffer_names") or ()), {}, {}
    for name, tensor in module.items():
        if name in buffers or not tensor.is_floating_point():
            continue
        key = (tensor.data_ptr(), tuple(tensor.shape))  # a tied weight is stored once, under each name
        aliases.setdefault(first_at.setdefault(key, name), []).append(name)
    named = [(n, torch.nn.Parameter(torch.empty(module[n].shape, device="meta"))) for n in aliases]
    by_id = {id(p): n for n, p in named}
    orders = [[n for n, _ in named]]
    for no_decay_embeddings in (True, False):
        groups = param_groups(_NamedParameters(named), 0.0, no_decay_embeddings)
        orders.insert(0, [by_id[id(p)] for g in groups for p in g["params"]])
    return aliases, orders


def _flat_masters(optimizer: dict) -> Optional[list]:
    """The fp32 master tensors of DeepSpeed's FP16 optimizers (bf16 or fp16 at ZeRO 0), in their order."""
    if optimizer.get("fp32_groups"):  # FP16_UnfusedOptimizer: one tensor per parameter
        return [t for group in optimizer["fp32_groups"] for t in group]
    if optimizer.get("fp32_groups_flat"):  # FP16_Optimizer: one flat tensor per group, split below
        return [t.flatten() for t in optimizer["fp32_groups_flat"]]
    return None


def zero0_fp32_masters(state: dict, origin: str) -> dict:
    """{name: fp32 master} of a ZeRO-0 checkpoint trained in bf16 / fp16, whose module holds their rounding;
    empty where the module is the fp32 weights. Masters that do not round to the module are not used."""
    module, optimizer = state["module"], state.get("optimizer")
    low = [v.dtype for v in module.values() if v.dtype in (torch.bfloat16, torch.float16)]
    masters = _flat_masters(optimizer) if low and isinstance(optimizer, dict) else None
    if not masters:
        return {}
    aliases, orders = _master_orders(module, state)
    for order in orders:
        matched = _match(order, masters, module)
        if matched is not None:
            return {alias: matched[n] for n in order for alias in aliases[n]}
    print(
        f"{origin}: the fp32 master weights in its optimizer state do not line up with its parameters: "
        f"using the module's {low[0]} weights",
        file=sys.stderr,
        flush=True,
    )
    return {}


def _match(order: list, masters: list, module: dict) -> Optional[dict]:
    """{name: master} where the masters, taken in `order`, have the parameters' shapes and round to them."""
    if len(masters) != len(order):  # a flat group per parameter group: split it by the parameters' sizes
        sizes = [module[n].numel() for n in order]
        flat = torch.cat(masters) if masters else torch.empty(0)
        if flat.numel() != sum(sizes):
            return None
        masters = list(flat.split(sizes))
    out = {}
    for name, master in zip(order, masters):
        weight = module[name]
        if master.numel() != weight.numel():
            return None
        master = master.float().reshape(weight.shape)
        if not torch.equal(master.to(weight.dtype), weight):
            return None
        out[name] = master.clone()
    return out
