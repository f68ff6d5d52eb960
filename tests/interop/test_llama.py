"""Hugging Face LlamaForCausalLM weights load into our Transformer (the Transformer++ block) with
equal logits: the architectures are the same network."""

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from retnet_train.interop.llama import config_from_llama, from_llama, llama_config  # noqa: E402
from retnet_train.model import TransformerConfig, build_model, model_config_from_dict  # noqa: E402

BASE = dict(
    vocab_size=61,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
)
TOLERANCE = 1e-4  # fp32, logits of magnitude ~1-3


def llama(**overrides):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**BASE, **overrides})
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))  # non-trivial norm weights
            else:
                p.mul_(4.0)  # std 0.08: scores and logits well away from zero
    return model, config


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(tie_word_embeddings=True, rms_norm_eps=1e-5),
        dict(num_attention_heads=2, num_key_value_heads=2, hidden_act="gelu", num_hidden_layers=3),
        dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    ],
)
def test_logits_equal_llama(overrides):
    hf, config = llama(**overrides)
    ours = from_llama(hf.state_dict(), config).eval()
    ids = torch.randint(0, BASE["vocab_size"], (2, 97))
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours(ids).logits
        labels = torch.randint(0, BASE["vocab_size"], (2, 97))
        ref_loss = torch.nn.functional.cross_entropy(ref.flatten(0, 1), labels.flatten())
        loss = ours(ids, labels=labels, return_logits=False).loss
    assert ref.abs().max() > 0.5
    assert (out - ref).abs().max() <= TOLERANCE
    assert abs(loss.item() - ref_loss.item()) <= TOLERANCE


@pytest.mark.parametrize("size", ["tiny", "125m"])
def test_the_transformer_pp_presets_are_llamas(size):
    """A Transformer++ preset and its LlamaConfig are the same network: config_from_llama(llama_config(c))
    gives c back field for field, and both models have the same parameter count."""
    import yaml

    path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "model", f"transformer_pp_{size}.yaml")
    with open(path) as f:
        preset = model_config_from_dict(yaml.safe_load(f))
    config = transformers.LlamaConfig(**llama_config(preset))
    back = config_from_llama(config)
    for field in (
        "vocab_size",
        "d_model",
        "n_layers",
        "n_heads",
        "ffn_dim",
        "ffn_type",
        "activation",
        "norm",
        "norm_eps",
        "tie_embeddings",
        "embed_scale",
        "rotary_base",
    ):
        assert getattr(back, field) == getattr(preset, field), field
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(config)
        ours = build_model(preset)
    assert ours.num_params() == hf.num_parameters()


def test_only_the_llama_block_has_a_llama_config():
    with pytest.raises(ValueError, match="norm=layernorm"):
        llama_config(TransformerConfig(vocab_size=10, d_model=32, n_layers=1, n_heads=2, ffn_dim=64))


@pytest.mark.parametrize(
    "overrides,key",
    [
        (dict(num_key_value_heads=2), "num_key_value_heads"),
        (dict(attention_bias=True), "attention_bias"),
        (dict(mlp_bias=True), "mlp_bias"),
        (dict(hidden_act="tanh"), "hidden_act"),
        (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}), "rope_type"),
    ],
)
def test_unsupported_llama_options_raise_naming_them(overrides, key):
    config = transformers.LlamaConfig(**{**BASE, **overrides}).to_dict()
    with pytest.raises(ValueError, match=key):
        config_from_llama(config)


def test_heads_that_do_not_divide_the_width_are_named():
    config = {**transformers.LlamaConfig(**BASE).to_dict(), "num_attention_heads": 5, "num_key_value_heads": 5}
    config["head_dim"] = None  # unset: derived from hidden_size / num_attention_heads
    with pytest.raises(ValueError, match=r"num_attention_heads=5 does not divide hidden_size=64"):
        config_from_llama(config)


def test_other_architectures_with_llama_weight_names_are_refused():
    """Mistral has Llama's weight names and, with kv heads = heads, its shapes, but a sliding window:
    loaded, its logits would differ (by ~4 here at 97 tokens, window 16)."""
    config = transformers.MistralConfig(**BASE, sliding_window=16)
    mistral = transformers.MistralForCausalLM(config)
    with pytest.raises(ValueError, match="model_type='mistral'"):
        from_llama(mistral.state_dict(), config)


def test_mismatched_state_dict_raises():
    hf, config = llama()
    with pytest.raises(ValueError, match="shape"):
        from_llama(hf.state_dict(), {**config.to_dict(), "intermediate_size": 128})
    sd = dict(hf.state_dict())
    del sd["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="missing model.layers.1.mlp.up_proj.weight"):
        from_llama(sd, config)


def test_untied_weights_are_refused_by_a_tied_config():
    """tie_word_embeddings=True with an lm_head that differs from the embedding (Hugging Face ties the
    head to the embedding; ours loaded the head's values into both): refused by name."""
    hf, config = llama()
    with pytest.raises(ValueError, match="tie_word_embeddings=true"):
        from_llama(hf.state_dict(), {**config.to_dict(), "tie_word_embeddings": True})


def test_rotary_inv_freq_buffers_of_older_checkpoints_are_dropped():
    """transformers < 4.31 saved each layer's rotary_emb.inv_freq: derived from the config, dropped."""
    hf, config = llama()
    sd = dict(hf.state_dict())
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, 16, 2).float() / 16)
    for i in range(BASE["num_hidden_layers"]):
        sd[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq
    ours = from_llama(sd, config).eval()
    ids = torch.randint(0, BASE["vocab_size"], (1, 19))
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max() <= TOLERANCE


def test_llama_config_keeps_the_activation():
    """llama_config writes the model's activation (gelu here), which config_from_llama reads back."""
    ours = config_from_llama(transformers.LlamaConfig(**BASE, hidden_act="gelu"))
    assert ours.activation == "gelu"
    assert llama_config(ours)["hidden_act"] == "gelu"
    assert config_from_llama(transformers.LlamaConfig(**llama_config(ours))).activation == "gelu"
