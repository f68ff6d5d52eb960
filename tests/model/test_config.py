import glob
import os
import re

import pytest
import torch
import yaml

from retnet_train.model import RetNetConfig, TransformerConfig, build_model, model_config_from_dict

PRESETS = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "model")


def load(name):
    with open(os.path.join(PRESETS, f"{name}.yaml")) as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(PRESETS, "*.yaml"))))
def test_preset_parameter_count_matches_name(path):
    name = os.path.basename(path)[:-5]
    config = model_config_from_dict(load(name))
    with torch.device("meta"):
        model = build_model(config)
    n = model.num_params()
    size = re.search(r"(\d+(?:\.\d+)?)b$", name)
    if size:
        assert abs(n / (float(size.group(1)) * 1e9) - 1) <= 0.05, (name, n)
    else:
        assert n < 5e6  # tiny: CPU-sized
    assert config.arch == ("transformer" if name.startswith("transformer") else "retnet")


@pytest.mark.parametrize("name", ["1.3b", "2.7b", "6.7b", "13b"])
def test_presets_follow_the_paper_and_have_twins(name):
    retnet, twin = model_config_from_dict(load(name)), model_config_from_dict(load(f"transformer_{name}"))
    assert retnet.key_head_dim == 256 and retnet.value_dim == 2 * retnet.d_model and retnet.ffn_dim == 2 * retnet.d_model
    assert (twin.d_model, twin.n_layers, twin.vocab_size) == (retnet.d_model, retnet.n_layers, retnet.vocab_size)


@pytest.mark.parametrize("override,field", [
    (dict(n_heads=3), "n_heads"),
    (dict(d_model=0), "d_model"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(mode="blocky"), "mode"),
    (dict(norm="batchnorm"), "norm"),
    (dict(value_factor=1.3), "value_factor"),
    (dict(retention_backend="cuda"), "retention_backend"),
])
def test_inconsistent_config_names_the_field(override, field):
    with pytest.raises(ValueError, match=rf"RetNetConfig\.{field}"):
        RetNetConfig(**{**dict(vocab_size=10, d_model=64, n_layers=1, n_heads=2, ffn_dim=8), **override}).validate()


def test_from_dict_rejects_unknown_keys_and_types():
    with pytest.raises(ValueError, match="model.n_layer"):
        model_config_from_dict({"arch": "retnet", "n_layer": 2})
    with pytest.raises(ValueError, match="model.d_model: expected int"):
        model_config_from_dict({"arch": "retnet", "d_model": "big"})
    with pytest.raises(ValueError, match="model.arch"):
        model_config_from_dict({"arch": "mamba"})
    cfg = model_config_from_dict({"arch": "transformer", "vocab_size": 10, "d_model": 64, "n_heads": 2, "norm_eps": 1})
    assert isinstance(cfg, TransformerConfig) and cfg.norm_eps == 1.0
    assert cfg.to_dict()["arch"] == "transformer"
