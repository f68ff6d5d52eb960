"""RetNetForCausalLM's parallel, chunkwise and recurrent forms agree: logits, gradients, state
handed from prefill to decoding, document resets, causality, and RetNetBlock.step."""

import pytest
import torch
from retnet_helpers import VOCAB, logits, make_model

from retnet_train.model import RetNetConfig, RetNetForCausalLM


@pytest.mark.parametrize("chunk", [1, 2, 16, 64, 512])
def test_three_forms_agree(chunk):
    model = make_model(chunk_size=chunk)
    for T in sorted({1, 7, chunk, 2 * chunk, 3 * chunk + 5}):
        if T > 600 and chunk != 512:
            continue
        ids = torch.randint(0, VOCAB, (2, T))
        ref = logits(model, ids, mode="parallel")
        for mode in ("chunkwise", "recurrent"):
            delta = (logits(model, ids, mode=mode) - ref).abs().max().item()
            assert delta <= 1e-4, (mode, T, chunk, delta)


def test_clamp_is_exercised(monkeypatch):
    """The agreement tests above only cover the score-sum normalization if some |c_t s_t| > 1."""
    import retnet_train.model.retnet as retnet_module

    model = make_model()
    sums = []
    real = retnet_module.retention_op

    def spy(*args, **kwargs):
        o, row_sums, state = real(*args, **kwargs)
        sums.append(row_sums)  # [B, T, H]
        return o, row_sums, state

    monkeypatch.setattr(retnet_module, "retention_op", spy)
    logits(model, torch.randint(0, VOCAB, (2, 50)), mode="parallel")
    lg = model.log_gamma.view(-1, 1)
    c = torch.sqrt(torch.expm1(lg) / torch.expm1(lg * torch.arange(1, 51))).t()  # [T, H]
    assert max((c * s).abs().max().item() for s in sums) > 2


def test_chunkwise_gradients_equal_parallel():
    model = make_model(chunk_size=8)
    ids = torch.randint(0, VOCAB, (2, 45))
    grads = {}
    for mode in ("parallel", "chunkwise"):
        model.zero_grad()
        model(ids, labels=torch.roll(ids, -1, 1), mode=mode).loss.backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, g in grads["parallel"].items():
        assert (g - grads["chunkwise"][name]).abs().max() <= 1e-4, name
    assert any(g.abs().max() > 1e-3 for g in grads["parallel"].values())


@pytest.mark.parametrize("prefill", [1, 13, 16])
def test_prefill_then_recurrent_equals_parallel(prefill):
    model = make_model()
    ids = torch.randint(0, VOCAB, (3, 24))
    ref = logits(model, ids, mode="parallel")
    with torch.no_grad():
        out = model(ids[:, :prefill], mode="chunkwise", return_state=True)
        steps, state = [out.logits], out.state
        for t in range(prefill, ids.shape[1]):
            out = model(ids[:, t : t + 1], mode="recurrent", state=state, return_state=True)
            steps.append(out.logits)
            state = out.state
    assert state.position == 24
    assert (torch.cat(steps, 1) - ref).abs().max() <= 1e-4


@torch.no_grad()
def test_bf16_prefill_hands_decoding_an_fp32_state():
    """A bf16 model's chunkwise prefill (one call, and two) hands recurrent decoding an fp32 state, and
    the decoded logits stay as close to the fp32 model's as the bf16 forms are (about 0.05 here)."""
    torch.manual_seed(0)
    model = make_model(d_model=64, n_heads=8, chunk_size=16)
    ids = torch.randint(0, VOCAB, (2, 300))
    ref = model(ids, mode="parallel").logits
    model = model.to(torch.bfloat16)
    for pieces in ([250], [100, 150]):
        state, lo = None, 0
        for n in pieces:
            state = model(ids[:, lo : lo + n], mode="chunkwise", state=state, return_state=True).state
            lo += n
        assert all(layer.dtype == torch.float32 for layer in state.layers), pieces
        steps = []
        for t in range(lo, ids.shape[1]):
            out = model(ids[:, t : t + 1], mode="recurrent", state=state, return_state=True)
            steps.append(out.logits)
            state = out.state
        assert (torch.cat(steps, 1).float() - ref[:, lo:]).abs().max() <= 0.08, pieces


@pytest.mark.parametrize("mode", ["parallel", "chunkwise"])
def test_bf16_forward_sums_the_state_exactly_only_when_returned(monkeypatch, mode):
    """A training forward (no return_state) skips the torch forms' fp32 re-sum of the final state
    (kernels/torch_retention._final_state); forward(return_state=True) runs it in every layer."""
    import retnet_train.kernels.torch_retention as torch_retention

    calls = []
    real = torch_retention._final_state
    monkeypatch.setattr(torch_retention, "_final_state", lambda *a: (calls.append(1), real(*a))[1])
    model = make_model(d_model=64, n_heads=8, chunk_size=16).to(torch.bfloat16).train()
    ids = torch.randint(0, VOCAB, (2, 64))
    model(ids, labels=ids, mode=mode).loss.backward()
    assert calls == []
    with torch.no_grad():
        state = model(ids, mode=mode, return_state=True).state
    assert len(calls) == model.config.n_layers
    assert all(layer.dtype == torch.float32 for layer in state.layers)


def test_documents_reset_in_all_forms():
    model = make_model()
    lengths = [5, 11, 1, 15]
    docs = [torch.randint(0, VOCAB, (1, n)) for n in lengths]
    packed = torch.cat(docs, 1)
    doc_starts = torch.zeros_like(packed, dtype=torch.bool)
    for pos in torch.tensor(lengths).cumsum(0)[:-1]:
        doc_starts[0, pos] = True
    separate = torch.cat([logits(model, d, mode="parallel") for d in docs], 1)
    for mode in ("parallel", "chunkwise", "recurrent"):
        out = logits(model, packed, doc_starts=doc_starts, mode=mode)
        assert (out - separate).abs().max() <= 1e-4, mode
    # without the boundaries the later documents see the earlier ones
    assert (logits(model, packed, mode="parallel") - separate).abs().max() > 1e-2


def test_document_reset_across_state():
    """A document that starts inside a later recurrent step resets the carried state too."""
    model = make_model()
    a, b = torch.randint(0, VOCAB, (1, 9)), torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        state = model(a, return_state=True).state
        starts = torch.zeros(1, 6, dtype=torch.bool)
        starts[0, 0] = True
        out = model(b, doc_starts=starts, state=state, mode="recurrent").logits
    assert (out - logits(model, b, mode="parallel")).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "overrides",
    [
        dict(norm="rmsnorm", ffn_type="glu", activation="silu"),
        dict(tie_embeddings=True, embed_scale=True, value_factor=1.0),
        dict(init="scaled_normal", head_norm_affine=True, normalize_retention=False),
    ],
)
def test_options_keep_forms_equal_and_train(overrides):
    model = make_model(**overrides)
    ids = torch.randint(0, VOCAB, (2, 19))
    ref = logits(model, ids, mode="parallel")
    assert (logits(model, ids, mode="chunkwise") - ref).abs().max() <= 1e-4
    assert (logits(model, ids, mode="recurrent") - ref).abs().max() <= 1e-4
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, 8, (4, 17))  # a small vocabulary subset: learnable fast
    losses = []
    for _ in range(30):
        loss = model(data[:, :-1], labels=data[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


@pytest.mark.parametrize("mode", ["parallel", "chunkwise", "recurrent"])
def test_causal(mode):
    """Changing tokens from position 10 on leaves earlier logits untouched."""
    model = make_model()
    ids = torch.randint(0, VOCAB, (2, 30))
    changed = ids.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % VOCAB
    a, b = logits(model, ids, mode=mode), logits(model, changed, mode=mode)
    assert (a[:, :10] - b[:, :10]).abs().max() < 1e-5
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-3


@pytest.mark.parametrize("normalize", [True, False])
@torch.no_grad()
def test_block_step_over_a_few_tokens_continues_the_forward(normalize):
    """RetNetBlock.step (what decoding runs) on 3 tokens, from the state the forward returned after a
    prefix, gives the forward's own continuation, and leaves the forward's state in its buffer."""
    from retnet_train.model.layers import rotary_sin_cos
    from retnet_train.model.retnet import decay_normalizer

    cfg = RetNetConfig(
        vocab_size=VOCAB,
        d_model=32,
        n_layers=2,
        n_heads=2,
        ffn_dim=48,
        chunk_size=4,
        retention_backend="torch",
        normalize_retention=normalize,
        head_norm_affine=True,
    )
    model = RetNetForCausalLM(cfg).double().eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    _, prefix = model.hidden_states(ids[:, :6], mode="chunkwise")
    want, after = model.hidden_states(ids[:, 6:], mode="recurrent", state=prefix)
    x = model.embed(ids[:, 6:])
    sin, cos = (t.unsqueeze(1) for t in rotary_sin_cos(model.inv_freq, 6, 3, x.dtype))
    c = decay_normalizer(model.log_gamma, prefix.doc_position[:, None] + torch.arange(3)) if normalize else None
    gamma = model.log_gamma.double().exp().view(1, -1, 1, 1)
    states = [s.clone() for s in prefix.layers]
    for block, state in zip(model.layers, states):
        x = block.step(x, sin, cos, state, gamma, c)
    torch.testing.assert_close(x, want, rtol=1e-10, atol=1e-10)
    for got, ref in zip(states, after.layers):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


@torch.no_grad()
def test_recurrent_form_in_bf16_keeps_every_head_decaying():
    """In bf16 the slow heads' decays (1 - 2^-9 and closer to 1, from the 5th head on) round to exactly 1:
    the recurrent form runs in fp32 with an fp32 state, so a bf16 model's three forms stay as close
    to the fp32 model as bf16 rounding allows, and the state it returns stays fp32."""
    torch.manual_seed(0)
    model = make_model(d_model=64, n_heads=8, chunk_size=16)
    ids = torch.randint(0, VOCAB, (2, 400))
    ref = model(ids, mode="parallel", return_state=True)
    model = model.to(torch.bfloat16)
    errors = {}
    for mode in ("parallel", "chunkwise", "recurrent"):
        out = model(ids, mode=mode, return_state=True)
        errors[mode] = (out.logits[:, -50:].float() - ref.logits[:, -50:]).abs().max().item()
        assert out.logits.dtype == torch.bfloat16, mode
        for got, want in zip(out.state.layers, ref.state.layers):
            assert (got.float() - want).abs().max() <= 0.01 * want.abs().max(), mode
    assert out.state.layers[0].dtype == torch.float32  # the recurrent form's
    # every form (about 0.05 here on logits of size ~1; decays rounded to bf16 in one form: 0.4)
    assert max(errors.values()) <= 0.1, errors
