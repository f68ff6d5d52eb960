"""fla's Hugging Face RetNet format: config.json (model_type "retnet") + model.safetensors for fla's
RetNetForCausalLM (`import fla; AutoModelForCausalLM.from_pretrained(dir)`) + tokenizer.model.

fla's RetNet is exactly ours only under conditions checked by `fla_compatibility`:
RMSNorm everywhere, a SwiGLU FFN (ffn_type=glu, activation=silu), a swish gate, no embedding
scale, head key dim <= 256, a per-head norm scale shared by all heads, and our rotation angles
equal to fla's. fla rotates the halves (i, i + K/2) with angles 10000^(-2i/K); we rotate pairs
(2i, 2i+1) with rotary_base^(-i/(K/2-1)) (torchscale's linspace). Pair layout is a permutation
of q/k rows (dot products unchanged); the angles agree only for rotary_base =
10000^((K/2-1)/(K/2)), e.g. 8659.6 for K=128, 9305.7 for K=256; other bases are refused.

normalize_retention=true is not in fla: our output is scaled per (position, head) by a factor
a_t > 0 before the per-head RMSNorm, and RMSNorm(a x) = x / sqrt(mean(x^2) + eps / a^2). The
factor cancels only through eps; a_t falls to ~2^-10 for the slowest-decaying heads, which makes
eps/a^2 ~ 1 - not negligible. So such models are refused unless allow_inexact=True (then the
export is marked "inexact" in config.json and logits differ).
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import torch

from ..inference.native import EXPORT_CONFIG, EXPORT_WEIGHTS, write_safetensors, write_tokenizer

FLA_ROTARY_BASE = 10000.0  # fla's MultiScaleRetention builds RotaryEmbedding(dim) with the default base


class ExportError(ValueError):
    """The model cannot be written in the requested format; the message says why."""


def fla_compatibility(model) -> List[str]:
    """Reasons why fla's RetNet cannot compute exactly what `model` computes (empty: exact)."""
    cfg = model.config
    if cfg.arch != "retnet":
        return [f"arch={cfg.arch}: only RetNet has an fla counterpart"]
    why = []
    if cfg.norm != "rmsnorm":
        why.append(f"norm={cfg.norm}: fla uses RMSNorm (with a scale) everywhere")
    if cfg.ffn_type != "glu" or cfg.activation != "silu":
        why.append(
            f"ffn_type={cfg.ffn_type}, activation={cfg.activation}: fla's FFN is SwiGLU (ffn_type=glu, activation=silu)"
        )
    if cfg.gate_activation != "silu":
        why.append(f"gate_activation={cfg.gate_activation}: fla's output gate is swish (silu)")
    if cfg.embed_scale:
        why.append("embed_scale=true: fla does not scale embeddings")
    K = cfg.key_head_dim
    if K > 256:
        why.append(f"key head dim {K} > 256: fla's rotary kernel does not support it")
    if K // 2 > 1:
        ours = 1.0 / cfg.rotary_base ** torch.linspace(0, 1, K // 2, dtype=torch.float64)
        theirs = 1.0 / FLA_ROTARY_BASE ** (torch.arange(0, K, 2, dtype=torch.float64) / K)
        if not torch.allclose(ours, theirs, rtol=1e-6, atol=0):
            need = FLA_ROTARY_BASE ** ((K / 2 - 1) / (K / 2))
            why.append(
                f"rotary_base={cfg.rotary_base}: our angles rotary_base^(-i/(K/2-1)) equal fla's 10000^(-2i/K) "
                f"only for rotary_base={need!r} (K={K})"
            )
    w = model.layers[0].retention.group_norm_weight
    if w is not None:
        for i, block in enumerate(model.layers):
            w = block.retention.group_norm_weight.detach().view(cfg.n_heads, -1)
            if not torch.equal(w, w[:1].expand_as(w)):
                why.append(
                    f"layer {i}: per-head norm scales differ across heads; fla's g_norm has one scale "
                    "shared by all heads"
                )
                break
    if cfg.normalize_retention:
        why.append(
            "normalize_retention=true: fla has no retention normalization; it cancels in the per-head RMSNorm "
            "only up to eps (retnet_train/interop/fla.py says why), so logits would differ"
        )
    return why


def _rotate_half_perm(n_heads: int, K: int) -> torch.Tensor:
    """Row order taking our interleaved pairs (2i, 2i+1) to fla's halves (i, i + K/2), per head."""
    per_head = torch.cat([torch.arange(0, K, 2), torch.arange(1, K, 2)])
    return (torch.arange(n_heads)[:, None] * K + per_head[None, :]).flatten()


def fla_state_dict(model) -> Dict[str, torch.Tensor]:
    cfg = model.config
    perm = _rotate_half_perm(cfg.n_heads, cfg.key_head_dim)
    sd = {"model.embeddings.weight": model.embed_tokens.weight, "model.norm.weight": model.norm.weight}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = model.lm_head.weight
    for i, block in enumerate(model.layers):
        r, p = block.retention, f"model.layers.{i}."
        sd[p + "attn_norm.weight"] = block.retention_norm.weight
        w = r.projection_weights()
        sd[p + "attn.q_proj.weight"] = w["q"][perm]
        sd[p + "attn.k_proj.weight"] = w["k"][perm]
        sd[p + "attn.v_proj.weight"] = w["v"].clone()  # own storage: safetensors refuses shared views
        sd[p + "attn.g_proj.weight"] = w["g"].clone()
        sd[p + "attn.o_proj.weight"] = r.out_proj.weight
        gw = r.group_norm_weight
        head_scale = torch.ones(cfg.value_head_dim) if gw is None else gw.detach()[: cfg.value_head_dim]
        sd[p + "attn.g_norm_swish_gate.weight"] = head_scale
        sd[p + "mlp_norm.weight"] = block.ffn_norm.weight
        sd[p + "mlp.gate_proj.weight"] = block.ffn.fc1.weight  # activated branch
        sd[p + "mlp.up_proj.weight"] = block.ffn.gate.weight  # linear branch
        sd[p + "mlp.down_proj.weight"] = block.ffn.fc2.weight
    return sd


def fla_config(model, tokenizer_ids: Optional[dict], dtype: Optional[torch.dtype], inexact: List[str]) -> dict:
    cfg = model.config
    tok = tokenizer_ids or {}
    out = {
        "model_type": "retnet",
        "architectures": ["RetNetForCausalLM"],
        "attn_mode": "chunk",
        "hidden_size": cfg.d_model,
        "expand_k": 1.0,
        "expand_v": cfg.value_dim / cfg.d_model,
        "hidden_ratio": None,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_heads": cfg.n_heads,
        "num_kv_heads": None,
        "feature_map": None,
        "hidden_act": "swish",
        "use_short_conv": False,
        "use_output_gate": True,
        "elementwise_affine": True,
        "norm_eps": cfg.norm_eps,
        "attn": None,
        "fuse_norm": True,
        "fuse_swiglu": True,
        "fuse_cross_entropy": True,
        "tie_word_embeddings": cfg.tie_embeddings,
        "vocab_size": cfg.vocab_size,
        "use_cache": True,
        "bos_token_id": tok.get("bos_token_id"),
        "eos_token_id": tok.get("eos_token_id"),
        "pad_token_id": tok.get("pad_token_id"),
        "torch_dtype": str(dtype or next(model.parameters()).dtype).replace("torch.", ""),
        "retnet_train": {"source_model": cfg.to_dict(), "inexact": inexact},
    }
    return out


def save_fla(
    model,
    out_dir: str,
    tokenizer_path: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
    allow_inexact: bool = False,
) -> str:
    """Write fla's HF RetNet format; refuses (ExportError) unless exact, see module docstring.
    allow_inexact only waives normalize_retention; structural mismatches always refuse."""
    why = fla_compatibility(model)
    waivable = [w for w in why if w.startswith("normalize_retention")]
    fatal = [w for w in why if w not in waivable]
    if fatal or (waivable and not allow_inexact):
        hint = " (--allow-inexact exports anyway, marked inexact)"
        if fatal:
            hint = " (--allow-inexact waives normalize_retention only)" if waivable else ""
        raise ExportError("fla export refused: " + "; ".join(fatal + waivable) + hint)
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(fla_state_dict(model), os.path.join(out_dir, EXPORT_WEIGHTS), dtype)
    tok = write_tokenizer(out_dir, tokenizer_path, model.config.vocab_size)
    with open(os.path.join(out_dir, EXPORT_CONFIG), "w") as f:
        json.dump(fla_config(model, tok, dtype, waivable), f, indent=2)
    return out_dir
