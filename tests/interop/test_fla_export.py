"""fla export: the weights, renamed and permuted, computed with fla's math (a plain-torch
transcription of fla 0.6.0's RetNet: RMSNorm, rotate-half RoPE with base 10000, retention with
gamma_h = 1 - 2^(-5-h) and scale K^-1/2, fused RMSNorm-swish gate, SwiGLU) give our logits;
incompatible models are refused with the reason. On GPU: fla's own model loads the export."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "inference"))
from gen_fixtures import VOCAB, tiny_model, train_tokenizer  # noqa: E402

from retnet_train.interop.fla import ExportError, fla_compatibility, fla_state_dict, save_fla  # noqa: E402


def fla_compatible(K=16, **kw):
    base = 10000.0 ** ((K / 2 - 1) / (K / 2))
    return dict(
        norm="rmsnorm",
        ffn_type="glu",
        activation="silu",
        normalize_retention=False,
        rotary_base=base,
        d_model=2 * K,
        n_heads=2,
        **kw,
    )


def _rms(x, w, eps):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def _rotate_half(x, T):
    K = x.shape[-1]
    inv = 1.0 / (10000.0 ** (torch.arange(0, K, 2, dtype=torch.float64) / K))
    f = torch.outer(torch.arange(T, dtype=torch.float64), inv)
    cos, sin = (torch.cat([t, t], -1).to(x.dtype)[None, :, None] for t in (f.cos(), f.sin()))
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def fla_forward(sd, c, ids):
    """fla.models.retnet.RetNetForCausalLM's forward (no cache), from its source."""
    eps, H = c["norm_eps"], c["num_heads"]
    x = sd["model.embeddings.weight"][ids]
    B, T, d = x.shape
    K = d // H
    Vh = int(d * c["expand_v"]) // H
    gamma = 1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float64))
    n = torch.arange(T, dtype=torch.float64)
    decay = (gamma[:, None, None] ** (n[:, None] - n[None, :]).clamp(min=0) * (n[:, None] >= n[None, :])).to(x.dtype)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _rms(x, sd[p + "attn_norm.weight"], eps)
        q = _rotate_half((h @ sd[p + "attn.q_proj.weight"].T).view(B, T, H, K), T)
        k = _rotate_half((h @ sd[p + "attn.k_proj.weight"].T).view(B, T, H, K), T)
        v = (h @ sd[p + "attn.v_proj.weight"].T).view(B, T, H, Vh)
        s = torch.einsum("bthk,bshk->bhts", q * K**-0.5, k) * decay
        o = torch.einsum("bhts,bshv->bthv", s, v)
        g = (h @ sd[p + "attn.g_proj.weight"].T).view(B, T, H, Vh)
        o = (_rms(o, sd[p + "attn.g_norm_swish_gate.weight"], eps) * F.silu(g)).reshape(B, T, -1)
        x = x + o @ sd[p + "attn.o_proj.weight"].T
        h = _rms(x, sd[p + "mlp_norm.weight"], eps)
        x = (
            x
            + (F.silu(h @ sd[p + "mlp.gate_proj.weight"].T) * (h @ sd[p + "mlp.up_proj.weight"].T))
            @ sd[p + "mlp.down_proj.weight"].T
        )
    x = _rms(x, sd["model.norm.weight"], eps)
    head = sd["model.embeddings.weight"] if c["tie_word_embeddings"] else sd["lm_head.weight"]
    return x @ head.T


def _randomize_norms(model):
    with torch.no_grad():  # norm scales away from 1, so a misplaced one shows
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": True}, {"value_factor": 1.0}])
@torch.no_grad()
def test_fla_export_matches_fla_math(tmp_path, kw):
    model = tiny_model("retnet", **fla_compatible(**kw)).double()
    _randomize_norms(model)
    assert fla_compatibility(model) == []
    tok = train_tokenizer(tmp_path)
    out = save_fla(model, str(tmp_path / "fla"), str(tok))
    cfg = json.loads((tmp_path / "fla" / "config.json").read_text())
    sd = load_file(str(tmp_path / "fla" / "model.safetensors"))
    assert cfg["model_type"] == "retnet" and cfg["intermediate_size"] == 64 and cfg["eos_token_id"] is not None
    assert (tmp_path / "fla" / "tokenizer.model").exists() and out.endswith("fla")
    ids = torch.randint(0, VOCAB, (2, 23))
    torch.testing.assert_close(
        fla_forward(sd, cfg, ids), model(ids, mode="parallel").logits, rtol=1e-5, atol=1e-5
    )  # our decays are fp32


@torch.no_grad()
def test_rotary_condition_is_needed():
    # with our default base the angles differ: refused, and indeed the math would not agree
    model = tiny_model("retnet", **{**fla_compatible(), "rotary_base": 10000.0}).double()
    why = fla_compatibility(model)
    assert len(why) == 1 and "rotary_base=10000.0" in why[0] and "3162.27" in why[0]
    cfg = {"norm_eps": 1e-6, "num_heads": 2, "expand_v": 2.0, "num_hidden_layers": 2, "tie_word_embeddings": False}
    ids = torch.randint(0, VOCAB, (1, 30))
    assert (fla_forward(fla_state_dict(model), cfg, ids) - model(ids).logits).abs().max() > 1e-2


def test_incompatible_models_are_refused(tmp_path):
    with pytest.raises(ExportError) as e:
        save_fla(tiny_model("retnet"), str(tmp_path / "a"))
    for reason in ("norm=layernorm", "ffn_type=mlp", "rotary_base", "normalize_retention"):
        assert reason in str(e.value)
    assert str(e.value).endswith("(--allow-inexact waives normalize_retention only)")
    assert not (tmp_path / "a").exists()
    with pytest.raises(ExportError, match="only RetNet"):
        save_fla(tiny_model("transformer"), str(tmp_path / "b"))
    m = tiny_model("retnet", **{**fla_compatible(), "head_norm_affine": True})
    with torch.no_grad():
        m.layers[1].retention.group_norm_weight[0] = 2.0
    with pytest.raises(ExportError, match="layer 1: per-head norm scales differ"):
        save_fla(m, str(tmp_path / "c"))
    # normalization alone is waivable, and the export says it is inexact
    m = tiny_model("retnet", **{**fla_compatible(), "normalize_retention": True})
    with pytest.raises(ExportError, match="--allow-inexact"):
        save_fla(m, str(tmp_path / "d"))
    save_fla(m, str(tmp_path / "d"), allow_inexact=True)
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert cfg["retnet_train"]["inexact"][0].startswith("normalize_retention")


@pytest.mark.gpu
@torch.no_grad()
def test_fla_model_loads_export_and_matches_on_gpu(tmp_path):
    try:  # a failure, not a skip: the GPU run must install flash-linear-attention (fla.models)
        import fla.models as fla_models
    except ImportError:
        pytest.fail("fla.models is missing: pip install flash-linear-attention==0.6.0 (pulls transformers>=5.6.2)")
    assert torch.cuda.is_available()
    K = 128  # the paper's head dims need fla's kernels' tile sizes; K=128, V=256
    model = tiny_model("retnet", **fla_compatible(K=K, n_layers=2, ffn_dim=512)).float()
    _randomize_norms(model)
    save_fla(model, str(tmp_path / "fla"))
    theirs = fla_models.RetNetForCausalLM.from_pretrained(str(tmp_path / "fla")).float().cuda().eval()
    model = model.cuda()
    ids = torch.randint(0, VOCAB, (2, 200), device="cuda")
    ref = model(ids, mode="parallel").logits
    got = theirs(ids).logits.float()
    # fla's Triton kernels may use TF32 for fp32 dots: a loose bound, but a wrong mapping is O(1) off
    torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.99


@torch.no_grad()
def test_shared_head_norm_scale_and_norm_eps_are_exported(tmp_path):
    """head_norm_affine=true with one scale shared by all heads (what fla's g_norm holds): exported as
    g_norm_swish_gate.weight, not ones, with logits equal to fla's math; config.json has the model's eps."""
    model = tiny_model("retnet", **fla_compatible(head_norm_affine=True, norm_eps=1e-5)).double()
    _randomize_norms(model)
    for block in model.layers:  # one scale per value dimension, the same in every head
        w = block.retention.group_norm_weight
        w.copy_(torch.rand(w.numel() // 2, dtype=w.dtype).add(0.5).repeat(2))
    assert fla_compatibility(model) == []
    save_fla(model, str(tmp_path / "fla"))
    cfg = json.loads((tmp_path / "fla" / "config.json").read_text())
    sd = load_file(str(tmp_path / "fla" / "model.safetensors"))
    assert cfg["norm_eps"] == 1e-5
    Vh = model.config.value_head_dim
    torch.testing.assert_close(
        sd["model.layers.1.attn.g_norm_swish_gate.weight"], model.layers[1].retention.group_norm_weight[:Vh]
    )
    ids = torch.randint(0, VOCAB, (2, 23))
    torch.testing.assert_close(fla_forward(sd, cfg, ids), model(ids, mode="parallel").logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kw,reason",
    [
        ({"gate_activation": "gelu"}, "gate_activation=gelu: fla's output gate is swish (silu)"),
        ({"embed_scale": True}, "embed_scale=true: fla does not scale embeddings"),
    ],
)
def test_gate_activation_and_embedding_scale_are_refused(kw, reason):
    """fla's gate is swish and it does not scale its embeddings: anything else is refused by name."""
    model = tiny_model("retnet", **fla_compatible(**kw))
    assert fla_compatibility(model) == [reason]
