"""Our export format: a directory of config.json ({"format": "retnet-train", "model": <preset dict>,
"tokenizer": its special ids, "documents_start_with_bos": how the training documents started, ...}),
model.safetensors (consolidated weights; a tied LM head stored once) and tokenizer.model. Written by
`python -m retnet_train.inference.export`, read by load_model."""

from __future__ import annotations

import json
import os
import shutil
from typing import Dict, Optional

import torch

from ..model import model_config_from_dict
from .errors import CheckpointError
from .tokenizer import check_tokenizer

EXPORT_CONFIG = "config.json"
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_TOKENIZER = "tokenizer.model"
EXPORT_FILES = (EXPORT_CONFIG, EXPORT_WEIGHTS, EXPORT_TOKENIZER)  # every file an export (ours or fla's) writes
FORMAT = "retnet-train"  # config.json["format"] of our own export (fla's export has none)


def is_export_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, EXPORT_CONFIG)) and os.path.isfile(os.path.join(path, EXPORT_WEIGHTS))


def written_by_an_export(path: str) -> bool:
    """Whether path's config.json is one that an export wrote: ours (format retnet-train) or fla's (with its
    retnet_train record); --overwrite replaces such a directory only."""
    try:
        with open(os.path.join(path, EXPORT_CONFIG)) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and (meta.get("format") == FORMAT or isinstance(meta.get("retnet_train"), dict))


def load_export(path: str):
    """(config, state_dict, meta) of a directory written by `save_native`."""
    from safetensors.torch import load_file

    cfg_path = os.path.join(path, EXPORT_CONFIG)
    try:
        with open(cfg_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: bad JSON or not UTF-8
        raise CheckpointError(f"{cfg_path}: cannot read: {e}") from None
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt != FORMAT:
        raise CheckpointError(
            f"{cfg_path}: not a retnet-train export (format={fmt!r}); fla/Hugging Face "
            "exports are for transformers, load our own export or the training checkpoint"
        )
    try:
        config = model_config_from_dict(meta["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: invalid model config: {e}") from None
    weights = os.path.join(path, EXPORT_WEIGHTS)
    try:
        state_dict = load_file(weights)
    except Exception as e:  # safetensors' own error type for a file cut short or not safetensors
        raise CheckpointError(f"{weights}: cannot be read ({type(e).__name__}: {e})") from None
    return config, state_dict, meta


def write_tokenizer(out_dir: str, tokenizer_path: Optional[str], vocab_size: int) -> Optional[dict]:
    """Copy the tokenizer into out_dir; returns its special ids (None for an absent id) or None."""
    if tokenizer_path is None:
        return None
    check_tokenizer(tokenizer_path, vocab_size)
    shutil.copyfile(tokenizer_path, os.path.join(out_dir, EXPORT_TOKENIZER))
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    return {
        k: (v if v >= 0 else None)
        for k, v in {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "pad_token_id": sp.pad_id()}.items()
    }


def check_in_range(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    """A finite weight that `dtype` cannot hold (float16 above 65504) would be stored as inf: refused."""
    biggest = torch.finfo(dtype).max
    finite = tensor[torch.isfinite(tensor)]
    if finite.numel() and finite.abs().max() > biggest:
        worst = finite[finite.abs().argmax()].item()
        raise ValueError(
            f"{name}: {worst:g} is beyond {str(dtype).replace('torch.', '')}'s range (+-{biggest:g}) and would be "
            "stored as inf; export in bfloat16 or float32"
        )


def write_safetensors(tensors: Dict[str, torch.Tensor], path: str, dtype: Optional[torch.dtype]) -> None:
    """Tensors on the host, floating ones cast to dtype (None: as they are)."""
    from safetensors.torch import save_file

    out = {}
    for k, v in tensors.items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            check_in_range(k, v, dtype)
            v = v.to(dtype)
        out[k] = v.contiguous()
    save_file(out, path, metadata={"format": "pt"})
    # safetensors writes through a private temporary file (mode 0600): give the weights the mode any
    # new file gets here, as config.json and tokenizer.model have, so that others can read an export
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_native(
    model,
    out_dir: str,
    tokenizer_path: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
    extra: Optional[dict] = None,
) -> str:
    """Write our export format (see module docstring); returns out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    cfg = model.config
    sd = dict(model.state_dict())
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight")  # one tensor on disk; the loader re-ties it
    write_safetensors(sd, os.path.join(out_dir, EXPORT_WEIGHTS), dtype)
    tok = write_tokenizer(out_dir, tokenizer_path, cfg.vocab_size)
    meta = {"format": FORMAT, "model": cfg.to_dict(), "tokenizer": tok, **(extra or {})}
    with open(os.path.join(out_dir, EXPORT_CONFIG), "w") as f:
        json.dump(meta, f, indent=2)
    return out_dir
