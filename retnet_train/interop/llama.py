"""Load Hugging Face `LlamaForCausalLM` weights into TransformerForCausalLM.

A Llama block is our Transformer block with norm=rmsnorm, ffn_type=glu, activation=silu and no
biases (the Transformer++ presets). The one difference is the layout of rotary pairs inside a
head: Llama rotates dimension j with j + head_dim/2, we rotate 2j with 2j+1, at the same frequency.
Permuting the rows of q_proj and k_proj (the same permutation for both, so every score is
unchanged) maps one onto the other; values and outputs keep their order.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..model import TransformerConfig, TransformerForCausalLM
from .legacy import tied_head

ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "relu": "relu"}


def _llama_dict(hf_config: Any) -> dict:
    return hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)


def _rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}  # transformers >= 5
    scaling = cfg.get("rope_scaling") or {}  # earlier releases
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ValueError(f"Llama config: rope_type={rope_type!r} (RoPE scaling) is not supported; only 'default'")
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def config_from_llama(hf_config: Any) -> TransformerConfig:
    """Our TransformerConfig for a transformers LlamaConfig (or its to_dict())."""
    cfg = _llama_dict(hf_config)
    d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    checks = {
        # Mistral, Qwen2, ... share Llama's weight names but not its network (sliding windows, biases,
        # q/k norms): refused by name rather than loaded with other logits
        "model_type": cfg.get("model_type", "llama") == "llama",
        "num_key_value_heads": (cfg.get("num_key_value_heads") or heads) == heads,  # no grouped-query attention
        "attention_bias": not cfg.get("attention_bias", False),
        "mlp_bias": not cfg.get("mlp_bias", False),
        "pretraining_tp": cfg.get("pretraining_tp", 1) == 1,
        "head_dim": (cfg.get("head_dim") or d // heads) * heads == d,
        "hidden_act": cfg.get("hidden_act", "silu") in ACTIVATIONS,
    }
    for key, ok in checks.items():
        if not ok:
            value = cfg.get(key)
            if key == "head_dim" and value is None:  # unset: derived, so name what it is derived from
                raise ValueError(
                    f"Llama config: num_attention_heads={heads} does not divide hidden_size={d} "
                    "(head_dim = hidden_size / num_attention_heads) and is not supported by retnet-train"
                )
            raise ValueError(f"Llama config: {key}={value!r} is not supported by retnet-train")
    config = TransformerConfig(
        vocab_size=cfg["vocab_size"],
        d_model=d,
        n_layers=cfg["num_hidden_layers"],
        n_heads=heads,
        ffn_dim=cfg["intermediate_size"],
        ffn_type="glu",
        activation=ACTIVATIONS[cfg.get("hidden_act", "silu")],
        norm="rmsnorm",
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        embed_scale=False,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        rotary_base=_rope_theta(cfg),
        document_masking=False,
    )
    config.validate()
    return config


def llama_config(config: TransformerConfig, max_position_embeddings: int = 2048) -> dict:
    """LlamaConfig(**kwargs) of the same network as a Transformer++ config (config_from_llama's inverse)."""
    if (config.norm, config.ffn_type, config.embed_scale) != ("rmsnorm", "glu", False):
        raise ValueError(
            f"model: norm={config.norm}, ffn_type={config.ffn_type}, embed_scale={config.embed_scale} "
            f"has no Llama twin (needs rmsnorm, glu, no embedding scale: the transformer_pp presets)"
        )
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_heads,
        head_dim=config.head_dim,
        hidden_act=config.activation,
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        rope_theta=config.rotary_base,
        max_position_embeddings=max_position_embeddings,
        attention_bias=False,
        mlp_bias=False,
    )


def half_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection from Llama's rotary layout (pairs j, j + hd/2) to ours (2j, 2j+1)."""
    out_features, d = weight.shape
    hd = out_features // n_heads
    return weight.view(n_heads, 2, hd // 2, d).transpose(1, 2).reshape(out_features, d)


LAYER_RENAMES = {
    "self_attn.o_proj": "attention.out_proj",
    "mlp.gate_proj": "ffn.fc1",  # silu(gate x) * (up x): fc1 carries the activation, our `gate` the product
    "mlp.up_proj": "ffn.gate",
    "mlp.down_proj": "ffn.fc2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}


def state_dict_from_llama(state_dict: Mapping[str, torch.Tensor], config: TransformerConfig) -> dict:
    """Our state dict for a LlamaForCausalLM state dict (rotary buffers dropped, q/k/v stacked)."""
    sd = {k.removeprefix("model."): v for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}
    out = {}
    for i in range(config.n_layers):
        p = f"layers.{i}."
        try:
            q, k, v = (sd.pop(f"{p}self_attn.{n}_proj.weight") for n in "qkv")
        except KeyError as e:
            raise ValueError(f"Llama state dict: missing model.{e.args[0]}") from None
        out[f"{p}attention.qkv_proj.weight"] = torch.cat(
            [half_to_interleaved(q, config.n_heads), half_to_interleaved(k, config.n_heads), v]
        )
        for old, new in LAYER_RENAMES.items():
            key = f"{p}{old}.weight"
            if key not in sd:
                raise ValueError(f"Llama state dict: missing model.{key}")
            out[f"{p}{new}.weight"] = sd.pop(key)
    for key in ("embed_tokens.weight", "norm.weight", "lm_head.weight"):
        if key in sd:
            out[key] = sd.pop(key)
    if sd:
        raise ValueError(f"Llama state dict: unexpected key {sorted(sd)[0]!r}")
    return tied_head(out, "tie_word_embeddings") if config.tie_embeddings else out


def from_llama(state_dict: Mapping[str, torch.Tensor], hf_config: Any) -> TransformerForCausalLM:
    """A TransformerForCausalLM with a LlamaForCausalLM's weights; its logits equal Llama's."""
    config = config_from_llama(hf_config)
    model = TransformerForCausalLM(config)
    ours = state_dict_from_llama(state_dict, config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(ours))
    if missing:
        raise ValueError(f"Llama state dict: missing weights for {missing[0]}")
    for key, value in ours.items():
        if value.shape != expected[key].shape:
            raise ValueError(
                f"Llama state dict: {key} has shape {tuple(value.shape)}, the config needs {tuple(expected[key].shape)}"
            )
    model.load_state_dict(ours)
    return model
