import glob
import math
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
    size = re.search(r"(\d+(?:\.\d+)?)([bm])$", name)
    if size:
        # at 125m the untied 32000-token embeddings are a third of the model: 134M
        tolerance = 0.05 if size.group(2) == "b" else 0.08
        assert abs(n / (float(size.group(1)) * {"b": 1e9, "m": 1e6}[size.group(2)]) - 1) <= tolerance, (name, n)
    else:
        assert n < 5e6  # tiny: CPU-sized
    assert config.arch == ("transformer" if name.startswith("transformer") else "retnet")


FAMILIES = ("", "transformer_", "transformer_pp_", "retnet_fla_")  # RetNet (paper), its twin, Llama-style, fla-style
SIZES = ("tiny", "125m", "1.3b", "2.7b", "6.7b", "13b")


def round_up(x: float, multiple: int) -> int:
    return multiple * math.ceil(x / multiple)


@pytest.mark.parametrize("size", SIZES)
def test_every_family_has_every_size_of_one_shape(size):
    retnet = model_config_from_dict(load(size))
    for family in FAMILIES[1:]:
        other = model_config_from_dict(load(f"{family}{size}"))
        assert (other.d_model, other.n_layers, other.vocab_size) == (retnet.d_model, retnet.n_layers, retnet.vocab_size)


@pytest.mark.parametrize("size", SIZES)
def test_transformer_pp_is_the_llama_block_of_12_d2(size):
    cfg = model_config_from_dict(load(f"transformer_pp_{size}"))
    d = cfg.d_model
    assert (cfg.norm, cfg.ffn_type, cfg.activation, cfg.embed_scale, cfg.tie_embeddings) == (
        "rmsnorm",
        "glu",
        "silu",
        False,
        False,
    )
    multiple = 64 if size == "tiny" else 256
    assert cfg.ffn_dim == round_up(8 * d / 3, multiple)
    with torch.device("meta"):
        block = build_model(cfg).layers[0]
    # 12 d^2, plus what rounding the FFN up adds
    assert 12 * d * d <= sum(p.numel() for p in block.parameters() if p.dim() == 2) < 12 * d * d + 3 * d * multiple
    assert not any(name.endswith("bias") for name, _ in block.named_parameters())  # RMSNorm, no biases


@pytest.mark.parametrize("size", SIZES)
def test_retnet_fla_is_the_paper_retention_with_a_swiglu_block_of_12_d2(size):
    cfg, paper = model_config_from_dict(load(f"retnet_fla_{size}")), model_config_from_dict(load(size))
    d = cfg.d_model
    assert (cfg.norm, cfg.ffn_type, cfg.activation) == ("rmsnorm", "glu", "silu")
    assert (cfg.key_head_dim, cfg.value_dim) == (paper.key_head_dim, paper.value_dim)
    multiple = 64 if size == "tiny" else 256
    assert cfg.ffn_dim == round_up(4 * d / 3, multiple)
    with torch.device("meta"):
        block = build_model(cfg).layers[0]
    assert 12 * d * d <= sum(p.numel() for p in block.parameters() if p.dim() == 2) < 12 * d * d + 3 * d * multiple


MODEL_PRESETS = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(PRESETS, "*.yaml")))


@pytest.mark.parametrize("name", MODEL_PRESETS)
def test_every_model_preset_composes_into_the_trainer_config(name):
    """`model=NAME` on the trainer's command line composes, types and validates."""
    from omegaconf import OmegaConf

    from retnet_train.components.config import check_values
    from retnet_train.preflight import compose_trainer_config

    cfg = OmegaConf.to_object(compose_trainer_config([f"model={name}"]))
    check_values(cfg)
    assert model_config_from_dict(cfg.model).to_dict() == model_config_from_dict(load(name)).to_dict()


@pytest.mark.parametrize("name", ["125m", "1.3b", "2.7b", "6.7b", "13b"])
def test_presets_follow_the_paper_and_have_twins(name):
    retnet, twin = model_config_from_dict(load(name)), model_config_from_dict(load(f"transformer_{name}"))
    assert retnet.key_head_dim == 256
    assert retnet.value_dim == 2 * retnet.d_model and retnet.ffn_dim == 2 * retnet.d_model
    assert (twin.d_model, twin.n_layers, twin.vocab_size) == (retnet.d_model, retnet.n_layers, retnet.vocab_size)


@pytest.mark.parametrize(
    "override,field",
    [
        (dict(n_heads=3), "n_heads"),
        (dict(d_model=0), "d_model"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(mode="blocky"), "mode"),
        (dict(norm="batchnorm"), "norm"),
        (dict(value_factor=1.3), "value_factor"),
        (dict(value_factor=0.001), "value_factor"),  # value dim round(0.064) = 0
        (dict(retention_backend="cuda"), "retention_backend"),
    ],
)
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


@pytest.mark.parametrize("d_model,n_heads,value_factor", [(40, 2, 1.36), (64, 1, 1.99)])
def test_value_factor_giving_a_fractional_value_dim_is_refused(d_model, n_heads, value_factor):
    """d_model * value_factor must be a whole number of value dims: 40 * 1.36 = 54.4 built a model of
    value dim 54 (a value_factor of 1.35) without a word; the error names the factor that gives 54."""
    cfg = RetNetConfig(
        vocab_size=10, d_model=d_model, n_layers=1, n_heads=n_heads, ffn_dim=8, value_factor=value_factor
    )
    with pytest.raises(ValueError, match=r"RetNetConfig\.value_factor: d_model \* value_factor = .* is not a whole"):
        cfg.validate()
    # a factor written as value_dim / d_model (as torchscale's import does) is a whole number of dims
    assert RetNetConfig(d_model=768, n_heads=4, value_factor=1280 / 768).value_dim == 1280
    RetNetConfig(d_model=768, n_heads=4, value_factor=1280 / 768).validate()


@pytest.mark.parametrize("arch", ["retnet", "transformer"])
def test_heads_that_do_not_divide_d_model_are_refused(arch):
    """d_model=100 over 8 heads would pass every other check (head dim 12, even; value dim 200 divisible
    by 8) and silently build heads of 12 = 96 / 8 dims."""
    with pytest.raises(ValueError, match=r"\.n_heads: 8 does not divide d_model=100"):
        model_config_from_dict(dict(arch=arch, vocab_size=10, d_model=100, n_layers=1, n_heads=8, ffn_dim=8))


def test_transformer_head_dim_must_be_even():
    """RoPE rotates pairs: a head dim of 15 is refused by the config, naming it, not by a shape error in the
    rotation at the first forward."""
    with pytest.raises(ValueError, match=r"TransformerConfig\.n_heads: head dim 15 must be even"):
        TransformerConfig(vocab_size=10, d_model=30, n_layers=1, n_heads=2, ffn_dim=8).validate()
