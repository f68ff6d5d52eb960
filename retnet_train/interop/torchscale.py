"""Load torchscale 0.3.0 RetNetDecoder weights into RetNetForCausalLM (the decoder's own state dict, or
a fairseq checkpoint's "model", whose keys carry a `decoder.` prefix)."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..model import RetNetConfig, RetNetForCausalLM
from .legacy import fuse_legacy_projections, tied_head

# torchscale RetNetConfig fields and defaults (torchscale/architecture/config.py, 0.3.0).
TORCHSCALE_DEFAULTS = {
    "decoder_embed_dim": 768,
    "decoder_value_embed_dim": 1280,
    "decoder_retention_heads": 3,
    "decoder_ffn_embed_dim": 1280,
    "decoder_layers": 12,
    "decoder_normalize_before": True,
    "activation_fn": "gelu",
    "dropout": 0.0,
    "drop_path_rate": 0.0,
    "activation_dropout": 0.0,
    "no_scale_embedding": True,
    "layernorm_embedding": False,
    "moe_freq": 0,
    "moe_top1_expert": False,
    "moe_expert_count": 0,
    "moe_gating_use_fp32": True,
    "moe_eval_capacity_token_fraction": 0.25,
    "moe_second_expert_policy": "random",
    "moe_normalize_gate_prob_before_dropping": False,
    "use_xmoe": False,
    "rel_pos_buckets": 0,
    "max_rel_pos": 0,
    "deepnorm": False,
    "subln": True,
    "multiway": False,
    "share_decoder_input_output_embed": False,
    "max_target_positions": 1024,
    "no_output_layer": False,
    "layernorm_eps": 1e-6,
    "chunkwise_recurrent": False,
    "recurrent_chunk_size": 512,
    "vocab_size": -1,
    "checkpoint_activations": False,
    "fsdp": False,
    "ddp_rank": 0,
    "xpos_rel_pos": False,
    "xpos_scale_base": 512,
}
# Options that change the network itself and that we do not implement.
UNSUPPORTED = {
    "moe_freq": lambda v: v != 0,
    "use_xmoe": bool,
    "multiway": bool,
    "deepnorm": bool,
    "layernorm_embedding": bool,
    "no_output_layer": bool,
    "decoder_normalize_before": lambda v: not v,
}
ACTIVATIONS = {"gelu": "gelu", "swish": "silu", "relu": "relu"}
RENAMES = {"retention_layer_norm": "retention_norm", "final_layer_norm": "ffn_norm"}
FAIRSEQ_PREFIX = "decoder."


def config_from_torchscale(ts_config: Mapping[str, Any]) -> RetNetConfig:
    unknown = sorted(set(ts_config) - set(TORCHSCALE_DEFAULTS))
    if unknown:
        raise ValueError(f"torchscale config: unknown option {unknown[0]!r}")
    ts = {**TORCHSCALE_DEFAULTS, **ts_config}
    # torchscale's own rules (RetNetConfig.__init__): deepnorm turns subln off, subln (on by default)
    # forces pre-norm, so decoder_normalize_before=False alone still builds a pre-norm model
    if ts["deepnorm"]:
        ts["decoder_normalize_before"] = False
        ts["subln"] = False
    if ts["subln"]:
        ts["decoder_normalize_before"] = True
    for name, is_set in UNSUPPORTED.items():
        if is_set(ts[name]):
            raise ValueError(f"torchscale config: {name}={ts[name]!r} is not supported by retnet-train")
    if ts["activation_fn"] not in ACTIVATIONS:
        raise ValueError(f"torchscale config: activation_fn={ts['activation_fn']!r} is not one of {list(ACTIVATIONS)}")
    if ts["vocab_size"] <= 0:
        raise ValueError(f"torchscale config: vocab_size must be > 0, got {ts['vocab_size']}")
    d = ts["decoder_embed_dim"]
    config = RetNetConfig(
        vocab_size=ts["vocab_size"],
        d_model=d,
        n_layers=ts["decoder_layers"],
        n_heads=ts["decoder_retention_heads"],
        ffn_dim=ts["decoder_ffn_embed_dim"],
        ffn_type="glu",
        activation=ACTIVATIONS[ts["activation_fn"]],
        norm="rmsnorm",
        norm_eps=ts["layernorm_eps"],
        embed_scale=not ts["no_scale_embedding"],
        tie_embeddings=ts["share_decoder_input_output_embed"],
        value_factor=ts["decoder_value_embed_dim"] / d,
        chunk_size=ts["recurrent_chunk_size"],
        mode="chunkwise" if ts["chunkwise_recurrent"] else "parallel",
    )
    config.validate()
    if config.value_dim != ts["decoder_value_embed_dim"]:
        raise ValueError(
            f"torchscale config: decoder_value_embed_dim={ts['decoder_value_embed_dim']} cannot be represented"
        )
    return config


def _rename(key: str) -> str:
    if key == "layer_norm.weight":
        return "norm.weight"
    if key == "output_projection.weight":
        return "lm_head.weight"
    for old, new in RENAMES.items():
        key = key.replace(f".{old}.", f".{new}.")
    return key


def without_fairseq_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """The decoder's own keys: torchscale's fairseq models hold the RetNetDecoder as `decoder`, so a
    fairseq checkpoint's "model" names every weight `decoder.<key>`."""
    prefixed = [k for k in state_dict if k.startswith(FAIRSEQ_PREFIX)]
    if not prefixed:
        return dict(state_dict)
    bare = [k for k in state_dict if not k.startswith(FAIRSEQ_PREFIX)]
    if bare:
        raise ValueError(
            f"torchscale state dict: some keys under fairseq's '{FAIRSEQ_PREFIX}' prefix ({prefixed[0]}), "
            f"others not ({bare[0]}); pass the decoder's weights alone"
        )
    return {k[len(FAIRSEQ_PREFIX) :]: v for k, v in state_dict.items()}


def from_torchscale(state_dict: Mapping[str, torch.Tensor], ts_config: Mapping[str, Any]) -> RetNetForCausalLM:
    """A RetNetForCausalLM with torchscale's weights; its logits equal torchscale's parallel forward."""
    config = config_from_torchscale(ts_config)
    model = RetNetForCausalLM(config)
    ours = {}
    for key, value in without_fairseq_prefix(state_dict).items():
        if key.startswith("retnet_rel_pos."):
            continue  # angle/decay buffers: we derive the same values from the config
        ours[_rename(key)] = value
    ours = fuse_legacy_projections(ours)  # torchscale's q/k/v_proj -> our stacked qkv_proj
    if config.tie_embeddings:  # a tied head may be stored once (safetensors' save_model keeps one name)
        ours = tied_head(ours, "share_decoder_input_output_embed")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(ours))
    unexpected = sorted(set(ours) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"torchscale state dict does not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for key, value in ours.items():
        if value.shape != expected[key].shape:
            raise ValueError(
                f"torchscale state dict: {key} has shape {tuple(value.shape)}, config needs "
                f"{tuple(expected[key].shape)}"
            )
    model.load_state_dict(ours)
    return model
