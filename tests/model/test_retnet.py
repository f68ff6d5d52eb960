"""RetNetForCausalLM: the three forms agree, state continues, documents reset, bad input fails."""

import copy
import functools

import pytest
import torch

from retnet_train.model import RetNetConfig, RetNetForCausalLM
from retnet_train.model.retnet import SequenceContext, decay_log_gammas
from retnet_train.parallel import parallelize
from retnet_train.parallel.context import context_parallel_core

VOCAB = 97


def make_model(**overrides):
    cfg = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, ffn_dim=48, chunk_size=4)
    cfg.update(overrides)
    model = RetNetForCausalLM(RetNetConfig(**cfg)).eval()
    with torch.no_grad():  # larger than the init so the score-sum clamp max(|s|, 1) is active
        for block in model.layers:
            w = block.retention.projection_weights()
            w["q"].mul_(6)
            w["k"].mul_(6)
    return model


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


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


def test_tied_embeddings_share_storage():
    model = make_model(tie_embeddings=True)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert "lm_head.weight" not in dict(model.named_parameters())
    assert model.num_params() == sum(p.numel() for p in model.parameters())


def _saved_bytes_and_grads(model, ids, mode):
    """Bytes the forward keeps for the backward (via saved-tensor hooks), and the gradients."""
    model = parallelize(copy.deepcopy(model), activation_checkpointing=mode)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids).loss
    loss.backward()
    return sum(saved), torch.cat([p.grad.flatten() for p in model.parameters()])


def test_activation_checkpointing_same_gradients_less_memory():
    model = make_model().train()
    ids = torch.randint(0, VOCAB, (2, 12))
    kept = {}
    grads = {}
    for mode in ("none", "selective", "full", True, False):
        kept[mode], grads[mode] = _saved_bytes_and_grads(model, ids, mode)
        assert torch.allclose(grads[mode], grads["none"], atol=1e-6), mode
    # the retention core keeps only q, k, v, which the block keeps anyway: selective recompute saves
    # only a few bytes of per-layer constants
    assert kept["full"] < kept["selective"] <= kept["none"] < 1.001 * kept["selective"]
    assert kept[True] == kept["full"] and kept[False] == kept["none"]
    with pytest.raises(ValueError, match="selective"):
        parallelize(model, activation_checkpointing="some")


def test_keeping_the_chunk_states_gives_the_same_gradients_for_more_memory():
    """retention_recompute=false: autograd keeps the chunk states [B, H, T/C + 1, K, V] instead of the
    backward recomputing them, for the same gradients."""
    ids = torch.randint(0, VOCAB, (2, 12))
    recomputed = make_model(retention_backend="torch").train()
    kept = make_model(retention_backend="torch", retention_recompute=False).train()
    kept.load_state_dict(recomputed.state_dict())
    bytes_recomputed, grads_recomputed = _saved_bytes_and_grads(recomputed, ids, "none")
    bytes_kept, grads_kept = _saved_bytes_and_grads(kept, ids, "none")
    assert torch.allclose(grads_kept, grads_recomputed, atol=1e-6)
    B, H, N, K, V = 2, 2, 12 // 4, 16, 32  # make_model: d 32, 2 heads, value dim 2d, chunk 4
    assert bytes_kept - bytes_recomputed >= 2 * B * H * (N + 1) * K * V * 4  # both layers' fp32 states


def test_loss_ignores_minus_100():
    model = make_model()
    ids = torch.randint(0, VOCAB, (1, 10))
    labels = ids.clone()
    labels[0, 5:] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
        ref = torch.nn.functional.cross_entropy(out.logits[0, :5], ids[0, :5])
    assert abs(out.loss.item() - ref.item()) < 1e-6


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


def test_chunked_loss_equals_full_logits_loss():
    import retnet_train.model.loss as loss_module

    model = make_model().train()
    ids = torch.randint(0, VOCAB, (3, 21))
    labels = torch.roll(ids, -1, 1)
    labels[1, 4:9] = -100
    results = []
    for return_logits in (True, False):
        model.zero_grad()
        out = model(ids, labels=labels, return_logits=return_logits)
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad.clone() for p in model.parameters()]))
        assert (out.logits is None) == (not return_logits)
    old = loss_module.CHUNK_BYTES
    loss_module.CHUNK_BYTES = 4 * VOCAB * 5  # 5 tokens per chunk: exercises the chunk loop
    try:
        model.zero_grad()
        out = model(ids, labels=labels, return_logits=False)
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad.clone() for p in model.parameters()]))
        with torch.no_grad():
            eval_loss = model(ids, labels=labels, return_logits=False).loss
    finally:
        loss_module.CHUNK_BYTES = old
    ref_loss, ref_grads = results[0]
    assert abs(eval_loss - ref_loss) < 1e-5
    for loss, grads in results[1:]:
        assert abs(loss - ref_loss) < 1e-5
        for a, b in zip(grads, ref_grads):
            assert (a - b).abs().max() < 1e-5


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


def test_context_parallel_asks_for_the_state_gradient(monkeypatch):
    """Context parallelism backpropagates through the final state: the context-parallel core says so to the
    dispatcher (which keeps it off the Triton kernels, tests/kernels/test_dispatch.py)."""
    import retnet_train.model.retnet as retnet_module

    used = []
    real = retnet_module.retention_op
    monkeypatch.setattr(retnet_module, "resolve_backend", lambda backend, device: "triton")
    monkeypatch.setattr(
        retnet_module,
        "retention_op",
        lambda backend, *a, state_grad, recompute: (used.append((backend, state_grad)), real("torch", *a))[1],
    )

    class Segment:  # stands in for parallel.context's segment: no earlier ranks
        def combine(self, o, row_sum, state, q, log_gamma):
            return o, row_sum

    msr = make_model().layers[0].retention
    q, k, v = torch.randn(1, 8, 2, msr.key_dim), torch.randn(1, 8, 2, msr.key_dim), torch.randn(1, 8, 2, msr.head_dim)
    ctx = SequenceContext(None, None, decay_log_gammas(2), torch.arange(8)[None], None, "chunkwise", 4)
    msr.retention_core(q, k, v, ctx, None)
    context_parallel_core(msr)(q, k, v, ctx, Segment())
    assert used == [("triton", False), ("triton", True)]


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


@functools.lru_cache(maxsize=None)  # the compiled default serves two tests: one CPU compile less
def kept_for_backward(compiled, activation_memory_budget=1.0, T=256):
    """One bf16 block (two heads, d_v 256) trained one step: [(bytes, dtype, numel)] of each tensor
    autograd keeps for backward (saved-tensor hooks see a compiled graph's too), and the gradients."""
    torch.manual_seed(0)
    model = (
        RetNetForCausalLM(
            RetNetConfig(
                vocab_size=VOCAB,
                d_model=128,
                n_layers=1,
                n_heads=2,
                ffn_dim=192,
                chunk_size=64,
                retention_backend="torch",
            )
        )
        .to(torch.bfloat16)
        .train()
    )
    if compiled:
        parallelize(model, compile=True, activation_memory_budget=activation_memory_budget)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen.setdefault(s.data_ptr(), (s.nbytes(), t.dtype, t.numel()))
        return t

    ids = torch.randint(0, VOCAB, (1, T))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids, labels=ids, return_logits=False).loss
        loss.backward()
    finally:
        torch._dynamo.reset()
        torch._functorch.config.activation_memory_budget = 1.0  # process-wide: back to torch's default
    return list(seen.values()), {n: p.grad.float() for n, p in model.named_parameters()}


def test_compiled_block_keeps_the_gate_input_in_bf16():
    """Under torch.compile the gate's silu upcasts g to fp32; with g computed before the retention
    the compiled graph kept that fp32 copy for backward instead of bf16 g (+1.5 GiB at 1.3B, 8k,
    measured on an H200). No fp32 [T, d_v] tensor may be kept, and compiled keeps less than eager.
    Two heads, as every preset has several: with one head the [B, T, H, V] transpose is a no-op and
    the partitioner keeps the group norm's fp32 input instead (seen on CPU, not at preset shapes)."""
    T, vd = 256, 256
    compiled, eager = kept_for_backward(True)[0], kept_for_backward(False)[0]
    assert not [s for s in compiled if s[1] == torch.float32 and s[2] >= T * vd], compiled
    assert sum(s[0] for s in compiled) < sum(s[0] for s in eager)


def test_activation_memory_budget_keeps_less_for_the_same_gradients():
    """A budget below 1 makes the compiled backward recompute elementwise work: at 0.8 this block
    keeps ~19% fewer bytes (1.21 -> 0.98 MB on CPU), and the gradients are the same computation."""
    full, grads = kept_for_backward(True)
    lean, lean_grads = kept_for_backward(True, activation_memory_budget=0.8)
    assert sum(s[0] for s in lean) < 0.85 * sum(s[0] for s in full)
    for name, g in grads.items():
        torch.testing.assert_close(lean_grads[name], g, rtol=2e-2, atol=1e-3, msg=name)
    for budget, compile_ in ((1.5, True), (0.0, True), (0.8, False)):
        with pytest.raises(ValueError, match="activation_memory_budget"):
            parallelize(make_model(), compile=compile_, activation_memory_budget=budget)


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
