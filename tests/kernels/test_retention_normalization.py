"""The retention normalization's value, before the per-head norm (which cancels any per-token scale
of it, so the block output alone cannot pin it): every form of the model against the paper's
normalized parallel retention written out below (Sun et al. 2023, section 2.2). The Triton
backend runs the same check under Triton's CPU interpreter (triton_interpreter.py)."""

import pytest
import torch

from retnet_train.model import RetNetConfig, RetNetForCausalLM

H = 2


def normalized_retention(x, wq, wk, wv, log_gamma):
    """x [B, T, d] (the retention's input), projection weights [out, d] -> ([B, T, H, V], |row sums|
    [B, H, T] before the max). Per head: R = (Q K^T / sqrt(d_k)) * D~ with D_nm = gamma^(n-m) for
    n >= m and D~_nm = D_nm / sqrt(sum_i D_ni); each row of R divided by max(|sum_m R_nm|, 1); out = R V.
    No rotation (the model under test has all its rotary frequencies at 0)."""
    B, T, _ = x.shape
    q, k, v = ((x @ w.T).view(B, T, H, -1).transpose(1, 2) for w in (wq, wk, wv))  # [B, H, T, *]
    d_k = q.shape[-1]
    n = torch.arange(T, dtype=torch.float64)
    gamma = log_gamma.double().exp().view(H, 1, 1)
    D = torch.where(n[:, None] >= n[None, :], gamma ** (n[:, None] - n[None, :]).clamp(min=0), 0.0)
    D_tilde = D / D.sum(-1, keepdim=True).sqrt()
    R = (q @ k.transpose(-1, -2)) / d_k**0.5 * D_tilde
    row = R.sum(-1, keepdim=True).abs()
    R = R / torch.maximum(row, torch.ones_like(row))
    return (R @ v).transpose(1, 2), row.squeeze(-1)


def model_without_rotation(backend, dtype):
    cfg = RetNetConfig(
        vocab_size=50, d_model=32, n_layers=1, n_heads=H, ffn_dim=48, chunk_size=4, retention_backend=backend
    )
    model = RetNetForCausalLM(cfg).to(dtype).eval()
    model.inv_freq.zero_()  # angles 0: the rotation is the identity
    with torch.no_grad():  # scores large enough that some rows' |sum| passes 1
        for name in "qk":
            model.layers[0].retention.projection_weights()[name].mul_(5)
    return model


def captured(model, ids, **kw):
    """The retention's input x and the per-head norm's input (the normalized retention) in one forward."""
    msr, seen = model.layers[0].retention, {}

    def keep(name):
        def hook(module, args):  # returns None: the module's input stays as it is
            seen[name] = args[0]

        return hook

    hooks = [msr.register_forward_pre_hook(keep("x")), msr.group_norm.register_forward_pre_hook(keep("normalized"))]
    try:
        with torch.no_grad():
            out = model(ids, return_state=True, **kw)
    finally:
        for h in hooks:
            h.remove()
    return seen["x"], seen["normalized"], out.state


def check_forms_against_formula(backend, dtype, runs, tol, T=11):
    """Each (mode, chunk size, prefill length) of `runs`: the prefill (chunkwise) hands its state to
    the run, which covers the rest; the per-head norm's input against the formula over the whole
    sequence of T tokens. The formula's rows are on both sides of 1, so the max(., 1) decides some."""
    model = model_without_rotation(backend, dtype)
    w = model.layers[0].retention.projection_weights()
    ids = torch.randint(0, 50, (2, T), generator=torch.Generator().manual_seed(0))
    x, _, _ = captured(model, ids, mode="parallel")
    with torch.no_grad():
        want, row = normalized_retention(x.double(), *(w[n].double() for n in "qkv"), model.log_gamma)
    assert (row < 0.9).any() and (row > 1.1).any(), row
    for mode, chunk, prefill in runs:
        state = None
        if prefill:
            state = captured(model, ids[:, :prefill], mode="chunkwise", chunk_size=chunk)[2]
        got = captured(model, ids[:, prefill:], mode=mode, chunk_size=chunk, state=state)[1]
        err = ((got.double() - want[:, prefill:]).abs().max() / want.abs().max()).item()
        assert err <= tol, (mode, chunk, prefill, err)


RUNS = [("parallel", 4, 0), ("chunkwise", 1, 0), ("chunkwise", 3, 0), ("chunkwise", 4, 0), ("recurrent", 4, 0)]
RUNS += [("recurrent", 4, 5), ("chunkwise", 3, 7)]  # continuing a prefill's state


@pytest.mark.parametrize("mode,chunk,prefill", RUNS)
def test_normalized_retention_equals_the_formula(mode, chunk, prefill):
    """fp64 model; the normalization factor is computed in fp32 (MultiScaleRetention.normalization)."""
    check_forms_against_formula("torch", torch.float64, [(mode, chunk, prefill)], 1e-6)
