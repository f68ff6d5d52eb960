"""RetNetForCausalLM: tied embeddings, bad input, the state gradient for context parallelism, the
stacked q/k/v projections, exact constants under a cast. (The three forms: test_retnet_forms.py;
memory kept for backward: test_retnet_memory.py; the loss: test_loss.py.)"""

import pytest
import torch
from retnet_helpers import VOCAB, make_model

from retnet_train.model import RetNetConfig, RetNetForCausalLM
from retnet_train.model.retnet import SequenceContext, decay_log_gammas
from retnet_train.parallel.context import context_parallel_core


def test_tied_embeddings_share_storage():
    model = make_model(tie_embeddings=True)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert "lm_head.weight" not in dict(model.named_parameters())
    assert model.num_params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("bad", [[[-1, 3]], [[0, VOCAB]]])
def test_out_of_range_ids_raise(bad):
    with pytest.raises(ValueError, match="out of range"):
        make_model()(torch.tensor(bad))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(mode="blockwise"), "mode"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(doc_starts=torch.zeros(1, 3, dtype=torch.bool)), "doc_starts"),
    ],
)
def test_bad_call_arguments_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        make_model()(torch.zeros(1, 4, dtype=torch.long), **kw)


def test_context_parallel_asks_for_the_state_gradient(monkeypatch):
    """Context parallelism backpropagates through the final state: the context-parallel core says so to the
    dispatcher (which keeps it off the Triton kernels, tests/kernels/test_dispatch.py), and keeps it exact
    (the later ranks' outputs use it) in a forward that returns no state."""
    import retnet_train.model.retnet as retnet_module

    used = []
    real = retnet_module.retention_op
    monkeypatch.setattr(retnet_module, "resolve_backend", lambda backend, device, key_dim=0: "triton")
    monkeypatch.setattr(
        retnet_module,
        "retention_op",
        lambda backend, *a, state_grad, recompute, keep_state: (
            used.append((backend, state_grad, keep_state)),
            real("torch", *a),
        )[1],
    )

    class Segment:  # stands in for parallel.context's segment: no earlier ranks
        def combine(self, o, row_sum, state, q, log_gamma):
            return o, row_sum

    msr = make_model().layers[0].retention
    q, k, v = torch.randn(1, 8, 2, msr.key_dim), torch.randn(1, 8, 2, msr.key_dim), torch.randn(1, 8, 2, msr.head_dim)
    ctx = SequenceContext(None, None, decay_log_gammas(2), torch.arange(8)[None], None, "chunkwise", 4, False)
    msr.retention_core(q, k, v, ctx, None)
    context_parallel_core(msr)(q, k, v, ctx, Segment())
    assert used == [("triton", False, False), ("triton", True, True)]


def test_stacked_projections_match_separate_weights():
    """q/k/v live in one weight; each block is initialized as its own matrix (xavier with its
    own fan). (State dicts with the separate weights: tests/interop/test_legacy_keys.py.)"""
    import torch.nn.functional as F

    from retnet_train.model.layers import apply_rotary, rotary_sin_cos

    torch.manual_seed(0)
    model = RetNetForCausalLM(RetNetConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, ffn_dim=48))
    ret = model.layers[0].retention
    w = ret.projection_weights()
    assert [tuple(t.shape) for t in w.values()] == [(32, 32), (32, 32), (64, 32), (64, 32)]
    bound = lambda fan: 2**-2.5 * (6 / fan) ** 0.5  # noqa: E731 - xavier_uniform's bound
    assert w["q"].abs().max() > bound(32 + 64) and w["q"].abs().max() <= bound(32 + 32)
    assert w["v"].abs().max() <= bound(32 + 64)
    x = torch.randn(2, 5, 32)
    sin, cos = (t.unsqueeze(1) for t in rotary_sin_cos(model.inv_freq, 3, 5, x.dtype))
    q, k, v = ret.projections(x, sin, cos)
    torch.testing.assert_close(q, apply_rotary(F.linear(x, w["q"]).view(2, 5, 2, 16), sin, cos))
    torch.testing.assert_close(k, apply_rotary((F.linear(x, w["k"]) * 16**-0.5).view(2, 5, 2, 16), sin, cos))
    torch.testing.assert_close(v, F.linear(x, w["v"]).view(2, 5, 2, 32))
    assert len(list(model.layers[0].retention.parameters())) == 3  # qkv, g, out (no affine group norm)


@pytest.mark.parametrize("arch", ["retnet", "transformer"])
def test_a_cast_to_bf16_keeps_the_architectures_constants_exact(arch):
    """DeepSpeed casts only parameters, so training sees exact rotary frequencies and decays;
    inference casts the whole model (inference/load.py: model.to(dtype)) and must see the same ones."""
    from retnet_train.model import TransformerConfig, TransformerForCausalLM

    build = (
        (lambda: RetNetForCausalLM(RetNetConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=4, ffn_dim=48)))
        if arch == "retnet"
        else (
            lambda: TransformerForCausalLM(
                TransformerConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2, ffn_dim=48)
            )
        )
    )
    exact = dict(build().named_buffers())
    assert exact["inv_freq"].dtype == torch.float64
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.to(dtype=torch.bfloat16).float()):
        model = cast(build())
        assert next(model.parameters()).dtype != torch.float64
        for name, value in model.named_buffers():
            assert value.dtype == exact[name].dtype and torch.equal(value, exact[name]), name
    model = build().to(torch.bfloat16)
    ids = torch.randint(0, VOCAB, (1, 40))
    assert model(ids).logits.dtype == torch.bfloat16 and torch.isfinite(model(ids).logits.float()).all()


@pytest.mark.parametrize("mode", ["parallel", "chunkwise", "recurrent"])
@pytest.mark.parametrize("shape", [(2, 0), (0, 3)])
def test_empty_input_ids_raise_naming_them(mode, shape):
    with pytest.raises(ValueError, match=r"input_ids is empty \(shape \(%d, %d\)\)" % shape):
        make_model()(torch.zeros(shape, dtype=torch.long), mode=mode)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_gated_norm_is_the_swish_gate_times_each_heads_norm(norm):
    """gated_norm(g, o, factor) = swish(g) * GroupNorm(o * factor), a group per head: each head's V values
    normalized with the config's norm_eps (large here, so that it shows) and, with head_norm_affine, scaled
    by that head's own weights."""
    torch.manual_seed(0)
    H, V = 2, 16
    cfg = RetNetConfig(
        vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=H, ffn_dim=32, norm=norm, norm_eps=0.5, head_norm_affine=True
    )
    msr = RetNetForCausalLM(cfg).layers[0].retention
    assert msr.group_norm_weight.shape == (H * V,)
    with torch.no_grad():
        msr.group_norm_weight.copy_(torch.randn(H * V))
    o, g, factor = 0.3 * torch.randn(2, 3, H, V), torch.randn(2, 3, H * V), torch.rand(2, 3, H, 1) + 0.5
    x = (o * factor).double()
    if norm == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    normed = x / (x.pow(2).mean(-1, keepdim=True) + 0.5).sqrt() * msr.group_norm_weight.double().view(H, V)
    want = torch.nn.functional.silu(g.double()) * normed.flatten(-2)
    with torch.no_grad():
        torch.testing.assert_close(msr.gated_norm(g, o, factor).double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("init", ["torchscale", "scaled_normal"])
def test_init_draws_each_weight_at_its_scheme_std(init):
    """torchscale: embedding and LM head N(0, d^-1/2). scaled_normal (GPT-NeoX small_init + wang_init):
    std sqrt(2 / 5d) everywhere but the residual output projections (out_proj, fc2), 2 / (L sqrt d)."""
    torch.manual_seed(0)
    d, L = 256, 8
    model = RetNetForCausalLM(RetNetConfig(vocab_size=512, d_model=d, n_layers=L, n_heads=2, ffn_dim=512, init=init))
    small, out = (2 / (5 * d)) ** 0.5, 2 / (L * d**0.5)
    want = {"embed_tokens.weight": d**-0.5, "lm_head.weight": d**-0.5}
    if init == "scaled_normal":
        want = {"embed_tokens.weight": small, "lm_head.weight": small}
        for name in ("retention.qkv_proj", "retention.g_proj", "ffn.fc1"):
            want[f"layers.3.{name}.weight"] = small
        for name in ("retention.out_proj", "ffn.fc2"):
            want[f"layers.3.{name}.weight"] = out
    params = dict(model.named_parameters())
    for name, std in want.items():
        assert abs(params[name].std().item() / std - 1) < 0.03, (name, params[name].std().item(), std)
