"""State-dict keys written under other names: DeepSpeed's `module.` prefix, a tied LM head stored once,
and the retention's separate q/k/v projections (torchscale's names, and retnet-train's before they
were stacked into one qkv_proj weight)."""

from __future__ import annotations

from typing import Iterable

import torch

LEGACY_PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def fuse_legacy_projections(state_dict: dict) -> dict:
    """A state dict with separate retention.{q,k,v}_proj weights -> one with retention.qkv_proj;
    other keys unchanged."""
    out = dict(state_dict)
    for key in state_dict:
        if key.endswith(".retention.q_proj.weight"):
            prefix = key[: -len("q_proj.weight")]
            names = [f"{prefix}{p}.weight" for p in LEGACY_PROJECTIONS]
            if all(n in out for n in names):
                out[prefix + "qkv_proj.weight"] = torch.cat([out.pop(n) for n in names])
    return out


def has_separate_projections(names: Iterable[str]) -> bool:
    """Whether parameter names are those of a model with separate retention q/k/v weights."""
    return any(n.endswith("retention.q_proj.weight") for n in names)


def tied_head(state_dict: dict, option: str = "tie_embeddings") -> dict:
    """The state dict of a model with tied embeddings: its LM head stored once (as the embedding) is
    filled in; a head that differs from the embedding (weights trained untied) is refused, naming the
    config `option`: both names load into one matrix, so the head's values would replace the embedding."""
    out = dict(state_dict)
    head, embed = out.get("lm_head.weight"), out.get("embed_tokens.weight")
    if head is None and embed is not None:
        out["lm_head.weight"] = embed
    elif head is not None and embed is not None and head is not embed and not torch.equal(head, embed):
        raise ValueError(
            f"{option}=true, but the weights' LM head (lm_head.weight) differs from their token embedding "
            f"(embed_tokens.weight): they were trained untied; set {option}=false"
        )
    return out


def current_keys(state_dict: dict, tie_embeddings: bool) -> dict:
    """A saved state dict under today's names: no `module.` prefix, stacked q/k/v, and the LM head of a
    tied model (tied_head)."""
    out = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    out = fuse_legacy_projections(out)
    return tied_head(out) if tie_embeddings else out
