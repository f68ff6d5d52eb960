"""The benchmarks' models: our presets (configs/model/<name>.yaml) and fla's RetNet at a preset's size."""

from __future__ import annotations

import os

import yaml

from ..kernels import FLA_CHUNK
from ..model import model_config_from_dict
from ..model.flops import retention_flops, training_flops

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "model")


def load_preset(name: str, **overrides):
    path = os.path.join(CONFIG_DIR, f"{name}.yaml")
    if not os.path.exists(path):
        raise SystemExit(f"--preset: no model preset {path}")
    with open(path) as f:
        return model_config_from_dict({**yaml.safe_load(f), **overrides})


def hf_size(cfg) -> dict:
    """A preset's width, depth and vocabulary under Hugging Face's config names."""
    return dict(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, vocab_size=cfg.vocab_size)


def fla_reference(cfg):
    """fla's HF RetNetForCausalLM at our preset's width, depth, heads and value width; its FFN is fla's
    SwiGLU at hidden_ratio 2 (3 d x 256-rounded 4d/3: ~the 4 d^2 parameters of the presets' MLP, 1-2% more)."""
    from fla.models import RetNetConfig as FlaConfig
    from fla.models import RetNetForCausalLM as FlaRetNet

    return FlaRetNet(
        FlaConfig(
            **hf_size(cfg), num_heads=cfg.n_heads, expand_v=cfg.value_factor, hidden_ratio=2, fuse_cross_entropy=True
        )
    )


def fla_flops_per_token(config, n_params: int, seq_len: int) -> dict:
    """flops_per_token for fla's RetNetForCausalLM, from its HF config and its parameter count (each
    parameter once): N leaves out the input embedding, keeps the LM head (the embedding itself when
    tied), as for ours; retention with fla's key and value widths at its chunk size."""
    d, vocab = config.hidden_size, config.vocab_size
    linear = n_params - (0 if config.tie_word_embeddings else vocab * d)
    key_dim, value_dim = int(d * config.expand_k), int(d * config.expand_v)
    mixer = retention_flops(key_dim, value_dim, config.num_heads, FLA_CHUNK, seq_len)
    return training_flops(linear, config.num_hidden_layers, mixer)
