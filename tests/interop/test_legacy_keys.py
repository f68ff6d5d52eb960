"""State dicts under older or foreign key names load into today's model with equal logits."""

import torch

from retnet_train.interop.legacy import current_keys, fuse_legacy_projections, has_separate_projections
from retnet_train.model import RetNetConfig, RetNetForCausalLM

CFG = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=2, ffn_dim=48, retention_backend="torch")


def _separate(state_dict: dict) -> dict:
    """Today's stacked qkv_proj rewritten as the three weights torchscale (and older retnet-train) wrote."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith("qkv_proj.weight"):
            out.update({key.replace("qkv", p): part.clone() for p, part in zip("qkv", value.split([32, 32, 64]))})
        else:
            out[key] = value.clone()
    return out


@torch.no_grad()
def test_separate_projections_fuse_into_the_stacked_weight():
    model = RetNetForCausalLM(RetNetConfig(**CFG)).eval()
    legacy = _separate(model.state_dict())
    assert has_separate_projections(legacy) and not has_separate_projections(model.state_dict())
    fused = fuse_legacy_projections(legacy)
    assert set(fused) == set(model.state_dict())
    other = RetNetForCausalLM(RetNetConfig(**CFG)).eval()
    other.load_state_dict(fused)
    ids = torch.randint(0, 61, (1, 9))
    torch.testing.assert_close(other(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_current_keys_strips_the_module_prefix_and_reties_the_head():
    model = RetNetForCausalLM(RetNetConfig(**CFG, tie_embeddings=True))
    saved = {"module." + k: v for k, v in _separate(model.state_dict()).items() if k != "lm_head.weight"}
    keys = current_keys(saved, tie_embeddings=True)
    assert set(keys) == set(model.state_dict())
    assert keys["lm_head.weight"] is keys["embed_tokens.weight"]
    assert "lm_head.weight" not in current_keys(saved, tie_embeddings=False)  # untied: a missing head stays missing


def test_a_head_trained_untied_is_refused_by_a_tied_config():
    """Loaded into a tied model, an untied checkpoint's two matrices became one: the LM head's values
    replaced the embedding (load order), a different model without a word."""
    import pytest

    untied = RetNetForCausalLM(RetNetConfig(**CFG)).state_dict()
    with pytest.raises(ValueError, match="tie_embeddings=true.*lm_head.weight.*differs.*embed_tokens.weight"):
        current_keys(untied, tie_embeddings=True)
    tied = RetNetForCausalLM(RetNetConfig(**CFG, tie_embeddings=True)).state_dict()
    keys = current_keys({k: v.clone() for k, v in tied.items()}, tie_embeddings=True)  # equal copies: tied
    assert torch.equal(keys["lm_head.weight"], keys["embed_tokens.weight"])
