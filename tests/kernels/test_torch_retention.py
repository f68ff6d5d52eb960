"""The three retention forms are one function: checked on raw tensors, with resets and state."""
import pytest
import torch

from retnet_train.kernels.torch_retention import chunkwise_retention, parallel_retention, recurrent_retention
from retnet_train.model.retnet import decay_log_gammas

B, H, K, V = 2, 3, 8, 6


def inputs(T):
    q, k = torch.randn(B, H, T, K), torch.randn(B, H, T, K) * K ** -0.5
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
    for o, _ in (parallel_retention(q, k, v, lg), chunkwise_retention(q, k, v, lg, chunk), recurrent_retention(q, k, v, lg)):
        assert (o.double() - ref).abs().max() < 1e-4


@pytest.mark.parametrize("chunk", [1, 4, 16])
def test_resets_and_final_state(chunk):
    T = 37
    q, k, v, lg = inputs(T)
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[0, [5, 6, 20]] = True
    reset[1, [36]] = True
    ref = naive(q, k, v, lg, reset)
    outs = [parallel_retention(q, k, v, lg, reset), chunkwise_retention(q, k, v, lg, chunk, reset), recurrent_retention(q, k, v, lg, reset)]
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


@pytest.mark.parametrize("mode,chunk", [("parallel", 1), ("chunkwise", 1), ("chunkwise", 5), ("chunkwise", 16), ("recurrent", 1)])
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


def test_chunkwise_keeps_no_decayed_copy_of_q():
    """The inter-chunk output is (q S) * decay, not (q * decay) S: backward then needs q itself,
    which the intra-chunk scores keep anyway, and no decayed copy of it (0.75 GiB at 1.3B, 8k on an
    H200). What stays of q's size: q, k and the decayed k of the chunk summaries."""
    q, k, v, lg = inputs(32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    kept = set()

    def pack(t):
        if t.numel() == q.numel():
            kept.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunkwise_retention(q, k, v, lg, 4)  # chunk != K: the scores are not of q's size
    assert {q.untyped_storage().data_ptr(), k.untyped_storage().data_ptr()} <= kept
    assert len(kept) == 3
