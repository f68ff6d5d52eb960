"""Load a model for inference from a training checkpoint or an exported directory.

Accepted paths:
  * an exported dir (inference/native.py): config.json + model.safetensors (+ tokenizer.model);
  * a DeepSpeed checkpoint: a run dir, the save dir holding `latest`, or a tag dir inside it, written
    by `engine.save_checkpoint` at any ZeRO stage and world size (inference/deepspeed_checkpoint.py).

The model config comes from the checkpoint's client state (the trainer stores the resolved config;
inference/client_state.py), or from a preset given by the caller.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from ..components.checkpoint_discovery import model_states_file
from ..interop.legacy import current_keys
from ..kernels import resolve_backend
from ..model import build_model, model_config_from_dict
from ..model.config import function_changes
from .client_state import framing_from_client_state, model_config_from_client_state, trained_tokenizer_from_client_state
from .deepspeed_checkpoint import consolidated_state_dict, read_model_states, resolve_deepspeed_dir
from .errors import CheckpointError
from .framing import FRAMING_KEY, read_framing
from .native import EXPORT_TOKENIZER, is_export_dir, load_export
from .tokenizer import TrainedTokenizer, choose_tokenizer


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config: Any  # RetNetConfig | TransformerConfig
    tokenizer_path: Optional[str]  # None when the checkpoint names none and none was given
    source: str  # "export" | "deepspeed"
    meta: dict  # extra facts (tag, zero stage, training step, ...)
    # whether every training document started with BOS (inference/framing.py); None: not recorded
    documents_start_with_bos: Optional[bool] = None

    @property
    def checkpoint_facts(self) -> dict:
        """What the trainer's checkpoint recorded (tag, step, data.seq_len): a DeepSpeed checkpoint's meta,
        or an export's record of the checkpoint it was exported from (empty where it has none)."""
        facts = self.meta if self.source == "deepspeed" else self.meta["export"].get("source")
        return facts if isinstance(facts, dict) else {}


def load_weights(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], origin: str) -> None:
    """Load a saved state dict (any key naming interop/legacy.py knows) or name what does not fit."""
    expected = model.state_dict()
    try:
        state_dict = current_keys(dict(state_dict), model.config.tie_embeddings)
    except ValueError as e:  # an LM head trained untied, under a tied config
        raise CheckpointError(f"{origin}: {e}") from None
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{origin}: weights do not match the model config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for key, value in state_dict.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{origin}: {key} has shape {tuple(value.shape)}, the config needs {tuple(expected[key].shape)}"
            )
    model.load_state_dict(state_dict)


def _from_export(path: str):
    config, state_dict, meta = load_export(path)
    stored_tok = os.path.join(path, EXPORT_TOKENIZER)
    framing = read_framing(meta.get(FRAMING_KEY), os.path.join(path, "config.json"))
    trained = TrainedTokenizer(stored_tok if os.path.isfile(stored_tok) else None)
    return config, state_dict, trained, "export", {"export": meta}, framing


def _given_or_stored_config(model_config: Optional[Mapping], state: Mapping, origin: str):
    """--model-config where the checkpoint stores no model config; where it stores one, --model-config may
    change how the weights are computed (mode, chunk_size, backend), not what: that would be other logits
    from the same weights, without a word."""
    if model_config is None:
        return model_config_from_client_state(state, origin)
    try:
        stored = model_config_from_client_state(state, origin)
    except CheckpointError:  # none stored (or not readable): the given one is the only one
        return model_config_from_dict(model_config)
    changes = function_changes(stored.to_dict(), model_config)
    if changes:
        raise CheckpointError(
            f"--model-config: {origin} stores the model config it was trained with, and this one changes what "
            f"its weights compute ({'; '.join(changes)}); drop --model-config (it is for checkpoints that store none)"
        )
    return model_config_from_dict(model_config)


def _from_deepspeed(path: str, tag: Optional[str], model_config: Optional[Mapping]):
    choice = resolve_deepspeed_dir(path, tag)
    # which checkpoint was read, whether chosen in a directory or named; stdout stays for results. Once per
    # job: the trainer's ranks each read train.init_weights
    if int(os.environ.get("RANK", "0")) == 0:
        print(choice.note() or f"using checkpoint {choice.path}", file=sys.stderr, flush=True)
    save_dir, tag = choice.directory, choice.tag
    origin = model_states_file(os.path.join(save_dir, tag))
    state = read_model_states(os.path.join(save_dir, tag))
    config = _given_or_stored_config(model_config, state, origin)
    trained = trained_tokenizer_from_client_state(state, save_dir, origin)
    framing = framing_from_client_state(state, origin)
    meta = {
        "tag": tag,
        "save_dir": save_dir,
        "global_steps": state.get("global_steps"),
        "ds_version": state.get("ds_version"),
        "seq_len": ((state.get("config") or {}).get("data") or {}).get("seq_len"),  # the trainer's data.seq_len
    }
    del state
    return config, consolidated_state_dict(save_dir, tag), trained, "deepspeed", meta, framing


def runnable_here(config, device: str | torch.device):
    """The config with a retention_backend that runs on `device`: the backend is how training ran, not
    what the weights compute, so one that cannot run here (triton or fla on CPU) gives way to auto."""
    backend = getattr(config, "retention_backend", "auto")
    if backend in ("auto", "torch"):
        return config
    try:
        resolve_backend(backend, torch.device(device), config.key_head_dim)
    except ValueError:
        here = resolve_backend("auto", torch.device(device), config.key_head_dim)
        print(f"model.retention_backend={backend} cannot run on {device}: using {here}", file=sys.stderr, flush=True)
        return dataclasses.replace(config, retention_backend="auto")
    return config


def _read(path: str, tag: Optional[str], model_config: Optional[Mapping]):
    """(config, state dict, TrainedTokenizer, source, meta, documents_start_with_bos) of an export dir or a
    DeepSpeed checkpoint."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint or export directory")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: a file; pass the directory (a run dir, a checkpoint dir or tag, an export)")
    if not is_export_dir(path):
        return _from_deepspeed(path, tag, model_config)
    # an export is one set of weights with its own config: neither option could apply
    if tag is not None:
        raise CheckpointError(f"--tag {tag}: {path} is an export directory, which has no checkpoint tags")
    if model_config is not None:
        raise CheckpointError(f"--model-config: {path} is an export directory; its config.json is the model config")
    return _from_export(path)


def read_weights(path: str) -> tuple:
    """(model config, state dict) of an export dir or a DeepSpeed checkpoint (its latest tag)."""
    config, state_dict, *_ = _read(path, None, None)
    return config, state_dict


def load_model(
    path: str,
    tag: Optional[str] = None,
    tokenizer: Optional[str] = None,
    model_config: Optional[Mapping] = None,
    device: str | torch.device = "cpu",
    dtype: Optional[torch.dtype] = None,
) -> LoadedModel:
    """A ready (eval mode) model from an export dir or a DeepSpeed checkpoint; see module doc.

    tokenizer overrides the one stored with the checkpoint; model_config (a preset dict) is for
    checkpoints whose client state carries no config.
    """
    config, state_dict, trained, source, meta, framing = _read(path, tag, model_config)
    config = runnable_here(config, device)
    model = build_model(config)
    load_weights(model, state_dict, path)
    model.eval().to(device=device, dtype=dtype)
    tok = choose_tokenizer(tokenizer, trained, path, config.vocab_size)
    return LoadedModel(model, config, tok, source, meta, framing)
