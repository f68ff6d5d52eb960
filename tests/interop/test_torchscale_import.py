"""torchscale 0.3.0 RetNetDecoder weights load into our model with equal logits in every form."""

import pytest
import torch

torchscale_retnet = pytest.importorskip("torchscale.architecture.retnet")
from torchscale.architecture.config import RetNetConfig as TorchscaleConfig  # noqa: E402

from retnet_train.interop.torchscale import from_torchscale  # noqa: E402

BASE = dict(
    decoder_embed_dim=64,
    decoder_value_embed_dim=128,
    decoder_retention_heads=2,
    decoder_ffn_embed_dim=96,
    decoder_layers=2,
    vocab_size=61,
)


def torchscale_decoder(ts_config, weight_scale):
    args = TorchscaleConfig(**ts_config)
    embed = torch.nn.Embedding(ts_config["vocab_size"], ts_config["decoder_embed_dim"])
    decoder = torchscale_retnet.RetNetDecoder(args, embed_tokens=embed).eval()
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(weight_scale)  # > 1 makes the score-sum normalization clamp
            elif p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))  # non-trivial norm weights
    return decoder


@pytest.mark.parametrize(
    "ts_config,scale",
    [
        ({}, 1.0),
        ({}, 8.0),
        (dict(activation_fn="swish", no_scale_embedding=False), 4.0),
        (dict(share_decoder_input_output_embed=True, decoder_value_embed_dim=64, layernorm_eps=1e-5), 4.0),
        (dict(decoder_retention_heads=4, decoder_layers=3, activation_fn="relu"), 6.0),
    ],
)
def test_logits_equal_torchscale_parallel(ts_config, scale):
    cfg = {**BASE, **ts_config}
    decoder = torchscale_decoder(cfg, scale)
    model = from_torchscale(decoder.state_dict(), cfg).eval()
    ids = torch.randint(0, cfg["vocab_size"], (2, 41))
    with torch.no_grad():
        ref = decoder(ids)[0]
        for mode in ("parallel", "chunkwise", "recurrent"):
            out = model(ids, mode=mode, chunk_size=8).logits
            assert (out - ref).abs().max() <= 1e-4, mode
    assert ref.abs().max() > 0.5


@pytest.mark.parametrize(
    "option,value",
    [
        ("moe_freq", 2),
        ("multiway", True),
        ("deepnorm", True),
        ("layernorm_embedding", True),
        ("no_output_layer", True),
    ],
)
def test_unsupported_options_raise_naming_them(option, value):
    with pytest.raises(ValueError, match=option):
        from_torchscale({}, {**BASE, option: value})


def test_mismatched_state_dict_raises():
    decoder = torchscale_decoder(BASE, 1.0)
    with pytest.raises(ValueError, match="shape|missing"):
        from_torchscale(decoder.state_dict(), {**BASE, "decoder_ffn_embed_dim": 128})
    with pytest.raises(ValueError, match="unknown option 'decoder_dim'"):
        from_torchscale(decoder.state_dict(), {**BASE, "decoder_dim": 3})


@torch.no_grad()
def test_normalize_before_false_is_pre_norm_under_subln():
    """torchscale's subln (on by default) forces decoder_normalize_before=True: such a config is a
    pre-norm model there and loads with equal logits; a real post-norm config is still refused."""
    cfg = {**BASE, "decoder_normalize_before": False}
    decoder = torchscale_decoder(cfg, 4.0)
    assert decoder.layers[0].normalize_before
    model = from_torchscale(decoder.state_dict(), cfg).eval()
    ids = torch.randint(0, cfg["vocab_size"], (2, 17))
    assert (model(ids).logits - decoder(ids)[0]).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="decoder_normalize_before=False"):
        from_torchscale({}, {**cfg, "subln": False})


@torch.no_grad()
def test_tied_head_stored_once_loads():
    """A tied model whose state dict holds the shared weight once (safetensors' save_model keeps only
    embed_tokens.weight) loads with equal logits."""
    cfg = {**BASE, "share_decoder_input_output_embed": True}
    decoder = torchscale_decoder(cfg, 4.0)
    state = {k: v for k, v in decoder.state_dict().items() if k != "output_projection.weight"}
    model = from_torchscale(state, cfg).eval()
    assert model.lm_head.weight is model.embed_tokens.weight
    ids = torch.randint(0, cfg["vocab_size"], (2, 17))
    assert (model(ids).logits - decoder(ids)[0]).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="lm_head.weight"):  # untied: a missing head stays an error
        from_torchscale({k: v for k, v in decoder.state_dict().items() if k != "output_projection.weight"}, BASE)


@torch.no_grad()
def test_fairseq_decoder_prefix_is_stripped():
    """A fairseq checkpoint (torchscale's examples) holds the decoder's weights under 'decoder.': they
    load with equal logits; keys mixing prefixed and bare names stay an error that says which."""
    decoder = torchscale_decoder(BASE, 4.0)
    fairseq = {f"decoder.{k}": v for k, v in decoder.state_dict().items()}
    model = from_torchscale(fairseq, BASE).eval()
    ids = torch.randint(0, BASE["vocab_size"], (2, 17))
    assert (model(ids).logits - decoder(ids)[0]).abs().max() <= 1e-4
    mixed = {**decoder.state_dict(), "decoder.layer_norm.weight": decoder.layer_norm.weight}
    with pytest.raises(ValueError, match="some keys under fairseq's 'decoder.' prefix.*decoder.layer_norm.weight"):
        from_torchscale(mixed, BASE)


def test_untied_weights_are_refused_by_a_tied_config():
    """share_decoder_input_output_embed=True with a decoder trained untied: refused by name (loaded, the
    output projection's values replaced the embedding's)."""
    decoder = torchscale_decoder(BASE, 1.0)
    with pytest.raises(ValueError, match="share_decoder_input_output_embed=true"):
        from_torchscale(decoder.state_dict(), {**BASE, "share_decoder_input_output_embed": True})


def test_chunkwise_recurrent_sets_the_default_mode_and_chunk():
    """torchscale's chunkwise_recurrent / recurrent_chunk_size: our default forward form and its chunk."""
    from retnet_train.interop.torchscale import config_from_torchscale

    chunked = config_from_torchscale({**BASE, "chunkwise_recurrent": True, "recurrent_chunk_size": 32})
    assert (chunked.mode, chunked.chunk_size) == ("chunkwise", 32)
    parallel = config_from_torchscale(BASE)
    assert (parallel.mode, parallel.chunk_size) == ("parallel", 512)
