"""Load a model for inference from a training checkpoint or an exported directory.

Accepted paths:
  * an exported dir (`python -m retnet_train.export`): config.json + model.safetensors
    (+ tokenizer.model);
  * a DeepSpeed checkpoint: the save dir holding `latest` (or a tag dir inside it) written by
    `engine.save_checkpoint` at any ZeRO stage and world size. Weights are consolidated with
    DeepSpeed's own `deepspeed.utils.zero_to_fp32`; a stage-0 checkpoint without ZeRO optimizer
    shards carries the full weights in its `module` entry, which is used as is.

The model config comes from the checkpoint's client state (the trainer stores the resolved
config); see `model_config_from_client_state` for the keys looked at.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from .model import build_model, model_config_from_dict
from .model.retnet import fuse_legacy_projections

EXPORT_CONFIG = "config.json"
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_TOKENIZER = "tokenizer.model"
COMPLETE = "COMPLETE"
FORMAT = "retnet-train"  # config.json["format"] of our own export (fla's export has none)


class CheckpointError(ValueError):
    """A checkpoint or tokenizer that cannot be used; the message names the path."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config: Any  # RetNetConfig | TransformerConfig
    tokenizer_path: Optional[str]  # None when the checkpoint names none and none was given
    source: str  # "export" | "deepspeed"
    meta: dict  # extra facts (tag, zero stage, training step, ...)


def _find_model_config(obj: Any, depth: int = 0) -> Optional[Mapping]:
    """The first mapping with an `arch` key among the usual places of a resolved config."""
    if isinstance(obj, Mapping):
        if "arch" in obj and "d_model" in obj:
            return obj
        if depth < 3:
            for key in ("model_config", "model", "config", "cfg", "resolved_config"):
                if key in obj:
                    found = _find_model_config(obj[key], depth + 1)
                    if found is not None:
                        return found
    return None


def _to_plain(obj: Any) -> Any:
    """OmegaConf containers (if the trainer stored one) -> plain dicts."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:
        pass
    return obj


def model_config_from_client_state(state: Mapping, origin: str):
    """Model config from a DeepSpeed model-states dict: client_state["config"]["model"] (the
    resolved Hydra config), or client_state["model_config"], or a YAML/JSON string of either."""
    for key in ("config", "model_config", "resolved_config", "cfg"):
        value = _to_plain(state.get(key))
        if isinstance(value, str):
            import yaml

            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise CheckpointError(f"{origin}: client state {key!r} is not valid YAML/JSON: {e}") from None
        found = _find_model_config({key: value})
        if found is not None:
            try:
                return model_config_from_dict(found)
            except ValueError as e:
                raise CheckpointError(f"{origin}: stored model config is invalid: {e}") from None
    raise CheckpointError(f"{origin}: no model config in the checkpoint's client state (looked for "
                          f"config.model / model_config; keys present: {sorted(k for k in state if isinstance(k, str))[:20]}). "
                          "Pass --model-config PRESET.yaml")


def _resolve_relative(tok: Optional[str], state: Mapping, save_dir: str) -> Optional[str]:
    """A relative tokenizer path is relative to the training launch dir. The trainer's default
    save dir is <launch>/<run.dir>/checkpoints, so that dir is recovered from the save dir."""
    if tok is None or os.path.isabs(tok) or os.path.exists(tok):
        return tok
    cfg = _to_plain(state.get("config"))
    run_dir = cfg.get("run", {}).get("dir") if isinstance(cfg, Mapping) else None
    suffix = os.path.normpath(os.path.join(run_dir, "checkpoints")) if isinstance(run_dir, str) else None
    if suffix and not os.path.isabs(suffix) and save_dir.endswith(os.sep + suffix):
        candidate = os.path.join(save_dir[: -len(suffix)], tok)
        if os.path.exists(candidate):
            return candidate
    return tok


def _tokenizer_from_client_state(state: Mapping) -> Optional[str]:
    cfg = _to_plain(state.get("config"))
    candidates = []
    if isinstance(cfg, Mapping):
        for section in ("data", "tokenizer"):
            sub = cfg.get(section)
            if isinstance(sub, Mapping):
                candidates += [sub.get("tokenizer"), sub.get("tokenizer_path"), sub.get("path"), sub.get("model")]
            elif isinstance(sub, str):
                candidates.append(sub)
        candidates.append(cfg.get("tokenizer_path"))
    candidates.append(state.get("tokenizer_path"))
    return next((c for c in candidates if isinstance(c, str) and c.endswith(".model")), None)


def _complete(save_dir: str, tag: str) -> bool:
    return os.path.isfile(os.path.join(save_dir, tag, COMPLETE))


def _trainer_made(save_dir: str) -> bool:
    """Our trainer marks each finished save with COMPLETE (retnet_train/components/checkpoint.py)."""
    return bool(glob.glob(os.path.join(save_dir, "*", COMPLETE)))


def resolve_deepspeed_dir(path: str, tag: Optional[str] = None) -> tuple[str, str]:
    """(save_dir, tag) for a run dir (holding checkpoints/), a save dir with `latest`, a tag
    dir, or a save dir plus tag. In the trainer's layout only COMPLETE tags count: a `latest`
    that is not complete falls back to the newest complete tag, as resuming does."""
    path = os.path.abspath(path)
    if tag is None and not os.path.isfile(os.path.join(path, "latest")) and os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")  # a run dir
    if tag is None and glob.glob(os.path.join(path, "*_model_states.pt")):
        path, tag = os.path.dirname(path), os.path.basename(path)
        if _trainer_made(path) and not _complete(path, tag):
            raise CheckpointError(f"{os.path.join(path, tag)}: incomplete checkpoint (no {COMPLETE} marker: the save was interrupted)")
        return path, tag
    trainer = _trainer_made(path)
    if tag is None:
        latest = os.path.join(path, "latest")
        if os.path.isfile(latest):
            with open(latest) as f:
                tag = f.read().strip()
        if trainer and (tag is None or not _complete(path, tag)):
            tags = sorted(os.path.basename(os.path.dirname(c)) for c in glob.glob(os.path.join(path, "*", COMPLETE)))
            tag = tags[-1]  # step_%08d tags sort by step
        if tag is None:
            raise CheckpointError(f"{path}: not an exported model ({EXPORT_CONFIG} + {EXPORT_WEIGHTS}) nor a DeepSpeed "
                                  "checkpoint (no 'latest' file and no *_model_states.pt)")
    elif trainer and not _complete(path, tag):
        raise CheckpointError(f"{os.path.join(path, tag)}: incomplete checkpoint (no {COMPLETE} marker: the save was interrupted)")
    if not glob.glob(os.path.join(path, tag, "*_model_states.pt")):
        raise CheckpointError(f"{os.path.join(path, tag)}: no *_model_states.pt (missing or incomplete checkpoint tag {tag!r})")
    return path, tag


def _model_states_file(tag_dir: str) -> str:
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if os.path.isfile(os.path.join(tag_dir, name)):
            return os.path.join(tag_dir, name)
    return sorted(glob.glob(os.path.join(tag_dir, "*_model_states.pt")))[0]


def _has_zero_optimizer_shards(tag_dir: str) -> bool:
    files = glob.glob(os.path.join(tag_dir, "*_optim_states.pt"))
    return any(os.path.basename(f).startswith(("zero_pp_rank_", "bf16_zero_pp_rank_")) for f in files)


def consolidated_state_dict(save_dir: str, tag: str) -> dict:
    """Full fp32 weights of a DeepSpeed checkpoint, any ZeRO stage and world size."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = os.path.join(save_dir, tag)
    if _has_zero_optimizer_shards(tag_dir):
        # zero_to_fp32 reports progress with print(): keep stdout for our results (JSON, text)
        with contextlib.redirect_stdout(sys.stderr):
            return get_fp32_state_dict_from_zero_checkpoint(save_dir, tag=tag)
    # No ZeRO partitions (stage 0 with a plain optimizer): the module entry is the full model.
    state = torch.load(_model_states_file(tag_dir), map_location="cpu", weights_only=False)
    module = state.get("module")
    if not module:
        raise CheckpointError(f"{tag_dir}: no ZeRO optimizer shards and no 'module' weights in the model states")
    return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}


def _load_weights(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], origin: str) -> None:
    expected = model.state_dict()
    state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    state_dict = fuse_legacy_projections(state_dict)  # weights saved before q/k/v were stacked
    if model.config.tie_embeddings and "lm_head.weight" not in state_dict and "embed_tokens.weight" in state_dict:
        state_dict["lm_head.weight"] = state_dict["embed_tokens.weight"]
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{origin}: weights do not match the model config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, value in state_dict.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{origin}: {key} has shape {tuple(value.shape)}, the config needs {tuple(expected[key].shape)}")
    model.load_state_dict(state_dict)


def is_export_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, EXPORT_CONFIG)) and os.path.isfile(os.path.join(path, EXPORT_WEIGHTS))


def load_export(path: str):
    """(config, state_dict, meta) of a directory written by `export.save_native`."""
    from safetensors.torch import load_file

    cfg_path = os.path.join(path, EXPORT_CONFIG)
    try:
        with open(cfg_path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: cannot read: {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path}: not a retnet-train export (format={meta.get('format')!r}); "
                              "fla/Hugging Face exports are for transformers, load our own export or the training checkpoint")
    try:
        config = model_config_from_dict(meta["model"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: invalid model config: {e}") from None
    return config, load_file(os.path.join(path, EXPORT_WEIGHTS)), meta


def load_model(path: str, tag: Optional[str] = None, tokenizer: Optional[str] = None,
               model_config: Optional[Mapping] = None, device: str | torch.device = "cpu",
               dtype: Optional[torch.dtype] = None) -> LoadedModel:
    """A ready (eval mode) model from an export dir or a DeepSpeed checkpoint; see module doc.

    tokenizer overrides the one stored with the checkpoint; model_config (a preset dict) is for
    checkpoints whose client state carries no config.
    """
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint or export directory")
    if is_export_dir(path):
        config, state_dict, meta = load_export(path)
        source = "export"
        stored_tok = os.path.join(path, EXPORT_TOKENIZER)
        stored_tok = stored_tok if os.path.isfile(stored_tok) else None
        meta = {"export": meta}
    else:
        save_dir, tag = resolve_deepspeed_dir(path, tag)
        states_file = _model_states_file(os.path.join(save_dir, tag))
        state = torch.load(states_file, map_location="cpu", weights_only=False, mmap=True)
        config = model_config_from_dict(model_config) if model_config is not None else model_config_from_client_state(state, states_file)
        stored_tok = _resolve_relative(_tokenizer_from_client_state(state), state, save_dir)
        meta = {"tag": tag, "save_dir": save_dir, "global_steps": state.get("global_steps"),
                "ds_version": state.get("ds_version")}
        del state
        state_dict = consolidated_state_dict(save_dir, tag)
        source = "deepspeed"
    model = build_model(config)
    _load_weights(model, state_dict, path)
    model.eval().to(device=device, dtype=dtype)
    tok = tokenizer or stored_tok
    if tok is not None and not os.path.isfile(tok):
        which = "--tokenizer" if tokenizer else f"the tokenizer named by {path}"
        raise CheckpointError(f"{which}: {tok} does not exist")
    if tok is not None:
        check_tokenizer(tok, config.vocab_size)
    if tokenizer and stored_tok and os.path.isfile(stored_tok) and _sha256(tokenizer) != _sha256(stored_tok):
        raise CheckpointError(f"--tokenizer: {tokenizer} differs from the tokenizer the model was trained with "
                              f"({stored_tok}); token ids would not mean the same pieces")
    return LoadedModel(model, config, tok, source, meta)


def _sha256(path: str) -> str:
    from .data import sha256_file

    return sha256_file(path)


def check_tokenizer(path: str, vocab_size: int) -> None:
    """A sentencepiece model whose vocabulary matches the model's embedding rows."""
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"tokenizer {path}: not a sentencepiece model ({e})") from None
    if sp.get_piece_size() != vocab_size:
        raise CheckpointError(f"tokenizer {path}: vocabulary of {sp.get_piece_size()} pieces, model has vocab_size={vocab_size}")
