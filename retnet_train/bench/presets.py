"""The benchmarks' models: our presets (configs/model/<name>.yaml) and fla's RetNet at a preset's size."""

from __future__ import annotations

import os

import yaml

from ..model import model_config_from_dict

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
    """fla's HF RetNetForCausalLM at our preset's size (swiglu FFN of ~the same parameters)."""
    from fla.models import RetNetConfig as FlaConfig
    from fla.models import RetNetForCausalLM as FlaRetNet

    return FlaRetNet(
        FlaConfig(
            **hf_size(cfg), num_heads=cfg.n_heads, expand_v=cfg.value_factor, hidden_ratio=2, fuse_cross_entropy=True
        )
    )
