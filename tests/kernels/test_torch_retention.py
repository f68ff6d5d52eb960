"""The three retention forms are one function: checked on raw tensors, with resets and state."""

import pytest
import torch

from retnet_train.kernels.torch_retention import (
    chunk_forward,
    chunkwise_retention,
    parallel_retention,
    recurrent_retention,
)
from retnet_train.model.retnet import decay_log_gammas

B, H, K, V = 2, 3, 8, 6


def inputs(T):
    q, k = torch.randn(B, H, T, K), torch.randn(B, H, T, K) * K**-0.5
    return q, k, torch.randn(B, H, T, V), decay_log_gammas(H)


def naive(q, k, v, log_gamma, reset=None):
    """o_t = sum_{m<=t, same doc} gamma^(t-m) (q_t.k_m) v_m, written out with an explicit matrix."""
    T = q.shape[2]
    n = torch.arange(T)
    diff = (n[:, None] - n[None, :]).double()
    D = torch.where(diff >= 0, torch.exp(log_gamma.double().view(H, 1, 1) * diff.clamp(min=0)), 0.0)
    D = D.expand(B, H, T, T).clone()
    if reset is not None:
        seg = reset.long().cumsum(1)
        D = D * (seg[:, None, :, None] == seg[:, None, None, :])
    return ((q.double() @ k.double().transpose(-1, -2)) * D) @ v.double()


@pytest.mark.parametrize("T", [1, 7, 32, 53])
@pytest.mark.parametrize("chunk", [1, 3, 16, 512])
def test_forms_equal_naive(T, chunk):
    q, k, v, lg = inputs(T)
    ref = naive(q, k, v, lg)
    for o, _ in (
        parallel_retention(q, k, v, lg),
        chunkwise_retention(q, k, v, lg, chunk),
        recurrent_retention(q, k, v, lg),
    ):
        assert (o.double() - ref).abs().max() < 1e-4


@pytest.mark.parametrize("chunk", [1, 4, 16])
def test_resets_and_final_state(chunk):
    T = 37
    q, k, v, lg = inputs(T)
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[0, [5, 6, 20]] = True
    reset[1, [36]] = True
    ref = naive(q, k, v, lg, reset)
    outs = [
        parallel_retention(q, k, v, lg, reset),
        chunkwise_retention(q, k, v, lg, chunk, reset),
        recurrent_retention(q, k, v, lg, reset),
    ]
    for o, _ in outs:
        assert (o.double() - ref).abs().max() < 1e-4
    states = [s for _, s in outs]
    for s in states[1:]:
        assert (s - states[0]).abs().max() < 1e-4
    # a reset at the last token leaves only that token in the state of sequence 1
    assert torch.allclose(states[2][1], k[1, :, -1, :, None] * v[1, :, -1, None, :], atol=1e-5)


@pytest.mark.parametrize("split", [1, 9, 24])
def test_state_continuation(split):
    T = 40
    q, k, v, lg = inputs(T)
    full, full_state = chunkwise_retention(q, k, v, lg, 8)
    o1, s1 = chunkwise_retention(q[:, :, :split], k[:, :, :split], v[:, :, :split], lg, 8)
    o2, s2 = recurrent_retention(q[:, :, split:], k[:, :, split:], v[:, :, split:], lg, state=s1)
    assert (torch.cat([o1, o2], 2) - full).abs().max() < 1e-4
    assert (s2 - full_state).abs().max() < 1e-4


def test_chunkwise_gradients_match_parallel():
    q, k, v, lg = inputs(29)
    grads = []
    for fn in (lambda *a: parallel_retention(*a)[0], lambda *a: chunkwise_retention(*a, 4)[0]):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        (fn(*leaves, lg) * torch.linspace(-1, 1, 6)).sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        assert (a - b).abs().max() < 1e-4


@pytest.mark.parametrize(
    "mode,chunk", [("parallel", 1), ("chunkwise", 1), ("chunkwise", 5), ("chunkwise", 16), ("recurrent", 1)]
)
@pytest.mark.parametrize("with_resets", [False, True])
def test_row_sums_and_their_state_column(mode, chunk, with_resets):
    """Row sums s_t = sum_m D_tm q_t.k_m and the state's extra column z (the decayed key sum)
    from every form, also across a split where the second half continues the first's state."""
    from retnet_train.kernels import _torch_op

    T, split = 37, 20
    q, k, v, lg = inputs(T)
    reset = None
    if with_resets:
        reset = torch.zeros(B, T, dtype=torch.bool)
        reset[0, [3, 21, 22]] = True
        reset[1, [20]] = True
    ref_s = naive(q, k, torch.ones(B, H, T, 1), lg, reset)[..., 0].transpose(1, 2)  # [B, T, H]
    ref_o, ref_state = recurrent_retention(q, k, torch.cat([v, torch.ones(B, H, T, 1)], -1), lg, reset)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # the op takes [B, T, H, D]
    o, s, state = _torch_op(qt, kt, vt, lg, mode, chunk, reset, None, True)
    assert (s.double() - ref_s).abs().max() < 1e-4
    assert (o.transpose(1, 2) - ref_o[..., :-1]).abs().max() < 1e-4
    assert (state - ref_state).abs().max() < 1e-4
    r1 = r2 = None
    if reset is not None:
        r1, r2 = reset[:, :split], reset[:, split:]
    _, s1, st1 = _torch_op(qt[:, :split], kt[:, :split], vt[:, :split], lg, mode, chunk, r1, None, True)
    o2, s2, st2 = _torch_op(qt[:, split:], kt[:, split:], vt[:, split:], lg, mode, chunk, r2, st1, True)
    assert (torch.cat([s1, s2], 1).double() - ref_s).abs().max() < 1e-4
    assert (st2 - ref_state).abs().max() < 1e-4


def retention_case(T, C, dtype=torch.float64, resets=True, with_state=True, row_sums=False, seed=0):
    """Leaves q, k, v (and an incoming state) requiring grad, resets, and a loss over the output and
    the final state, for comparing gradients."""
    g = torch.Generator().manual_seed(seed)
    Vs = V + 1 if row_sums else V
    q, k, v = (torch.randn(B, H, T, d, generator=g, dtype=dtype) for d in (K, K, V))
    k = k * K**-0.5
    state = torch.randn(B, H, K, Vs, generator=g, dtype=dtype) if with_state else None
    reset = None
    if resets:
        reset = torch.zeros(B, T, dtype=torch.bool)
        reset[0, sorted({2, C % T, (C + 1) % T, T - 1})] = True  # at a chunk start, right after, at the end
        reset[1, [T // 2]] = True
    leaves = [t.requires_grad_() for t in (q, k, v) + ((state,) if with_state else ())]
    weights = [torch.randn(B, H, T, V, generator=g, dtype=dtype), torch.randn(B, H, K, Vs, generator=g, dtype=dtype)]
    return leaves, reset, weights


def gradients(fn, leaves, reset, weights, lg):
    q, k, v, *state = leaves
    out = fn(q, k, v, lg, reset, state[0] if state else None)
    loss = (out[0] * weights[0]).sum() + (out[1] * weights[1]).sum()
    return torch.autograd.grad(loss, leaves), out


@pytest.mark.parametrize(
    "resets,with_state,row_sums", [(False, False, False), (True, True, False), (True, True, True), (False, True, True)]
)
@pytest.mark.parametrize("T,C", [(32, 8), (29, 4), (12, 12)])
def test_recomputing_backward_equals_autograd_of_the_forward(T, C, resets, with_state, row_sums):
    """ChunkRetention's backward (scores and chunk states recomputed from q, k, v) gives the gradients
    autograd gives through the plain forward, for q, k, v and the incoming state, with the final state
    in the loss (a partial last chunk continues the first part's state)."""
    lg = decay_log_gammas(H).double()
    leaves, reset, weights = retention_case(T, C, resets=resets, with_state=with_state, row_sums=row_sums)

    def plain(q, k, v, lg, reset, state):  # autograd through chunk_forward on the same pieces
        full = (T // C) * C
        out = chunk_forward(
            q[:, :, :full],
            k[:, :, :full],
            v[:, :, :full],
            lg,
            None if reset is None else reset[:, :full],
            state,
            C,
            row_sums,
        )
        if full == T:
            return out
        rest = chunk_forward(
            q[:, :, full:],
            k[:, :, full:],
            v[:, :, full:],
            lg,
            None if reset is None else reset[:, full:],
            out[1],
            T - full,
            row_sums,
        )
        return torch.cat([out[0], rest[0]], 2), rest[1]

    def ours(q, k, v, lg, reset, state):
        return chunkwise_retention(q, k, v, lg, C, reset, state, row_sums)

    want, ref = gradients(plain, leaves, reset, weights, lg)
    got, out = gradients(ours, leaves, reset, weights, lg)
    assert (out[0] - ref[0]).abs().max() < 1e-12 and (out[1] - ref[1]).abs().max() < 1e-12
    for a, b in zip(got, want):
        assert (a - b).abs().max() < 1e-10
    assert all(g.abs().max() > 1e-3 for g in got)


def test_recomputing_backward_equals_the_naive_oracle():
    """Gradients through the explicit T x T decay matrix (fp64), with resets."""
    lg = decay_log_gammas(H).double()
    leaves, reset, weights = retention_case(40, 8, with_state=False)
    weights[1].zero_()  # the oracle has no final state
    got, _ = gradients(lambda *a: chunkwise_retention(*a[:4], 8, a[4], a[5]), leaves, reset, weights, lg)
    want = torch.autograd.grad((naive(*leaves, lg, reset) * weights[0]).sum(), leaves)
    for a, b in zip(got, want):
        assert (a - b).abs().max() < 1e-10


def test_recomputing_backward_in_bf16():
    """bf16 inputs: the recomputed backward is as close to the fp64 gradients as autograd through the
    plain bf16 forward is (the same bf16 GEMMs, in the same order)."""
    lg = decay_log_gammas(H)
    T, C = 64, 16
    leaves64, reset, weights64 = retention_case(T, C, with_state=True)
    exact, _ = gradients(lambda *a: chunk_forward(*a[:5], a[5], C)[:2], leaves64, reset, weights64, lg.double())
    leaves = [t.detach().bfloat16().requires_grad_() for t in leaves64]
    weights = [w.bfloat16() for w in weights64]
    got, _ = gradients(lambda *a: chunkwise_retention(*a[:4], C, a[4], a[5]), leaves, reset, weights, lg)
    plain, _ = gradients(lambda *a: chunk_forward(*a[:5], a[5], C)[:2], leaves, reset, weights, lg)
    for g, p, e in zip(got, plain, exact):
        assert g.dtype == torch.bfloat16
        scale = e.abs().max()
        assert (g.double() - e).abs().max() <= max(1.5 * (p.double() - e).abs().max(), 1e-2 * scale)


def saved_bytes(fn, *args):
    """Bytes of the distinct storages autograd keeps for backward while fn(*args) runs."""
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(kept.values())


@pytest.mark.parametrize("compiled", [False, True])
def test_backward_keeps_q_k_v_whatever_the_chunk_size(compiled):
    """Per token, what the chunkwise form keeps for backward is q, k, v (bf16) and the resets: no
    scores (C per token and head) and no chunk states (K x V per chunk), eager and compiled (the
    compiled backward is one opaque op, so the partitioner cannot keep the forward's intermediates
    instead)."""
    torch._dynamo.reset()
    T, Hh, Kk, Vv = 128, 2, 16, 32
    lg = decay_log_gammas(Hh)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, T, Hh, d, generator=g).bfloat16().transpose(1, 2).requires_grad_() for d in (Kk, Kk, Vv))
    reset = torch.rand(1, T, generator=g) < 0.05
    qkv_bytes = sum(t.untyped_storage().nbytes() for t in (q, k, v))
    for C in (8, 32):

        def run(q, k, v, reset, C=C):
            o, _, s = chunkwise_retention(q, k, v, lg, C, reset, None, row_sums=True)
            return o, s

        fn = torch.compile(run, backend="aot_eager_decomp_partition") if compiled else run
        fn(q, k, v, reset)[0].float().sum().backward()  # compiles
        kept = saved_bytes(fn, q, k, v, reset)
        # q, k, v, the resets [1, T] and log_gamma [H]; compiled: the same, or copies of the same size
        assert qkv_bytes <= kept <= qkv_bytes + T + 4 * Hh, (C, kept, qkv_bytes)


def test_recurrent_calls_keep_the_fp32_state_in_bf16():
    """A bf16 model decoding with mode="recurrent" one call per token hands back the fp32 state it was
    given: the state is not rounded to bf16 between calls (where 1 - 2^-9 and closer decays round to 1),
    so token-by-token calls give the state and outputs of one call over all the tokens."""
    from retnet_train.kernels import retention_op

    T, Hh = 64, 8
    lg = decay_log_gammas(Hh)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, T, Hh, d, generator=g).bfloat16() for d in (K, K, V))
    o_all, s_all, state_all = retention_op("torch", q, k, v, lg, "recurrent", 64)
    state, outs, sums = None, [], []
    for t in range(T):
        o, s, state = retention_op(
            "torch", q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], lg, "recurrent", 64, None, state
        )
        outs.append(o)
        sums.append(s)
    assert state.dtype == torch.float32
    torch.testing.assert_close(state, state_all, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.cat(sums, 1), s_all, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.cat(outs, 1), o_all, rtol=0, atol=0)


@pytest.mark.parametrize("row_sums", [False, True])
def test_bf16_final_state_is_fp32_in_every_form(row_sums):
    """bf16 inputs: every torch form returns the final state in fp32 (the Triton kernels' format,
    triton_interpreter.check_bf16), within two bf16 roundings of the exact state of the same inputs,
    also when a prefill runs in two calls (the chunkwise form sums its chunk summaries with fp32
    decays and carries an fp32 incoming state unrounded; rounded to bf16 it was off by 1e-2)."""
    from retnet_train.kernels import retention_op

    T, C, Hh, Kk, Vv = 1000, 16, 8, 16, 32
    lg = decay_log_gammas(Hh)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, T, Hh, d, generator=g) for d in (Kk, Kk, Vv))
    q, k, v = q.bfloat16(), (k * Kk**-0.5).bfloat16(), v.bfloat16()
    exact = retention_op("torch", q.double(), k.double(), v.double(), lg, "recurrent", C, None, None, row_sums)[2]
    finals = {
        mode: retention_op("torch", q, k, v, lg, mode, C, None, None, row_sums)[2]
        for mode in ("parallel", "chunkwise", "recurrent")
    }
    first = retention_op("torch", q[:, :333], k[:, :333], v[:, :333], lg, "chunkwise", C, None, None, row_sums)[2]
    rest = (t[:, 333:] for t in (q, k, v))
    finals["two calls"] = retention_op("torch", *rest, lg, "chunkwise", C, None, first, row_sums)[2]
    for name, state in finals.items():
        assert state.dtype == torch.float32, name
        assert state.shape == exact.shape, name
        err = ((state.double() - exact).abs().max() / exact.abs().max()).item()
        assert err <= 2**-8, (name, err)
