"""What the trainer stored beside the weights (DeepSpeed's client state): the model config and the
tokenizer path, both inside the resolved config under client_state["config"], the tokenizer's sha256 and
absolute path at launch (client_state["tokenizer"]; not in checkpoints of older trainers), and how the
training documents started (client_state["documents_start_with_bos"], inference/framing.py)."""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

from ..model import model_config_from_dict
from .errors import CheckpointError
from .framing import FRAMING_KEY, read_framing
from .tokenizer import TrainedTokenizer

TOKENIZER_KEY = "tokenizer"  # components/loaders.py tokenizer_record: {"sha256": ..., "path": ...}


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
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(obj, (DictConfig, ListConfig)):
        return OmegaConf.to_container(obj, resolve=True)
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
    keys = sorted(k for k in state if isinstance(k, str))[:20]
    raise CheckpointError(
        f"{origin}: no model config in the checkpoint's client state (looked for config.model / "
        f"model_config; keys present: {keys}). Pass --model-config PRESET.yaml"
    )


def framing_from_client_state(state: Mapping, origin: str) -> Optional[bool]:
    """Whether every training document started with BOS; None for checkpoints that do not record it."""
    return read_framing(state.get(FRAMING_KEY), f"{origin}: client state")


def trained_tokenizer_from_client_state(state: Mapping, save_dir: str, origin: str) -> TrainedTokenizer:
    """The tokenizer the config names, with its recorded sha256 and launch path where the trainer stored them."""
    named = tokenizer_from_client_state(state, save_dir)
    record = state.get(TOKENIZER_KEY)
    if record is None:  # an older trainer's checkpoint, or one trained with data.tokenizer=null
        return TrainedTokenizer(named)
    sha, path = (record.get("sha256"), record.get("path")) if isinstance(record, Mapping) else (None, None)
    if not (isinstance(sha, str) and len(sha) == 64 and isinstance(path, str)):
        raise CheckpointError(
            f"{origin}: client state {TOKENIZER_KEY!r} is {record!r}, expected {{'sha256': <64 hex digits>, "
            "'path': <the tokenizer's path>}"
        )
    return TrainedTokenizer(named, sha, path)


def tokenizer_from_client_state(state: Mapping, save_dir: str) -> Optional[str]:
    """The sentencepiece model named by the stored config (None: none named), relative paths resolved."""
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
    tok = next((c for c in candidates if isinstance(c, str) and c.endswith(".model")), None)
    return _resolve_relative(tok, cfg, save_dir)


def _resolve_relative(tok: Optional[str], cfg: Any, save_dir: str) -> Optional[str]:
    """A relative tokenizer path is relative to the training launch dir. The trainer's default
    save dir is <launch>/<run.dir>/checkpoints, so that dir is recovered from the save dir; it comes
    before the current dir, which may hold another tokenizer under the same path."""
    if tok is None or os.path.isabs(tok):
        return tok
    run_dir = cfg.get("run", {}).get("dir") if isinstance(cfg, Mapping) else None
    suffix = os.path.normpath(os.path.join(run_dir, "checkpoints")) if isinstance(run_dir, str) else None
    if suffix and not os.path.isabs(suffix) and save_dir.endswith(os.sep + suffix):
        candidate = os.path.join(save_dir[: -len(suffix)], tok)
        if os.path.exists(candidate):
            return candidate
    return tok
