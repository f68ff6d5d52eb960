"""What the Triton tests share, on CPU (interpreter) and GPU: inputs with document starts, the torch
and Triton paths with a weighted backward, the error check, fixed block shapes, and each kernel
checked on its own against fp64 recurrences.

Tolerances, relative to each output's max magnitude: fp32 1e-4 (fp32 rounding only), bf16 2e-2
(8 bits of mantissa; the torch path in bf16 lands at ~5e-3)."""

import torch

from retnet_train.model.retnet import decay_log_gammas

FP32_TOL = 1e-4
BF16_TOL = 2e-2
NAMES = ["o", "row sums", "final state", "dq", "dk", "dv"]


def rel_err(a, ref):
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=1e-12)).item()


def inputs(B, T, H, K, V, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, T, H, K, device=device, generator=g)
    k = torch.randn(B, T, H, K, device=device, generator=g) * K**-0.5
    v = torch.randn(B, T, H, V, device=device, generator=g)
    return q, k, v


def resets(B, T, C, device="cpu", seed=0):
    """Document starts: at 0 in batch row 0, on a chunk boundary, inside chunks, and two adjacent."""
    g = torch.Generator(device=device).manual_seed(seed)
    reset = torch.rand(B, T, device=device, generator=g) < 4 / T
    reset[0, 0] = True
    reset[-1, min(C, T - 1)] = True
    reset[0, T // 2 : T // 2 + 2] = True
    return reset


def run(fn, q, k, v, dtype, state=None):
    leaves = [t.to(dtype).clone().requires_grad_() for t in (q, k, v)]
    o, s, final = fn(*leaves, state)
    w = torch.linspace(-1, 1, o.shape[-1], device=o.device, dtype=torch.float64)
    (o.double() * w).sum().backward()
    return [o, s, final, *(t.grad for t in leaves)]


def torch_path(C, lg, reset=None, row_sums=True):
    from retnet_train.kernels import retention_op

    return lambda q, k, v, state: retention_op(
        "torch", q, k, v, lg.to(q.device), "chunkwise", C, reset, state, row_sums
    )


def triton_path(C, lg, reset=None, row_sums=True):
    """The kernels themselves, not the dispatcher (which refuses key dims the GPU test has not passed)."""
    from retnet_train.kernels.triton_retention import triton_retention

    return lambda q, k, v, state: triton_retention(q, k, v, lg.to(q.device), C, state, row_sums, reset)


def assert_close(got, ref, tol, names=NAMES):
    """Every output within tol of its reference's max magnitude; a failure lists all the errors."""
    errs = {}
    for name, a, b in zip(names, got, ref):
        if b is None:
            assert a is None, name
            continue
        assert a.shape == b.shape, (name, a.shape, b.shape)
        errs[name] = rel_err(a, b)
    bad = [name for name, err in errs.items() if not err < tol]
    assert not bad, f"{bad}: relative error >= {tol}; all: " + ", ".join(f"{n} {e:.2e}" for n, e in errs.items())


def reference_states(q, k, v, do, lg, C, reset, s0, z0):
    """The kernels' chunk-entry states by their recurrences (triton_retention_states), in fp64:
    S [B*H, N, K, V], z [B*H, N, K], the final S [B*H, K, V] and z [B*H, K], and dG [B*H, N, K, V]."""
    from retnet_train.kernels.triton_retention import doc_starts

    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v, do = (t.double().transpose(1, 2) for t in (q, k, v, do))  # [B, H, T, D]
    g = lg.double().exp().view(1, H, 1)
    doc = doc_starts(reset)
    S, z = s0.double().view(B, H, K, V), z0.double().view(B, H, K)
    states, sums, carries, gains = [], [], [], []
    for c0 in range(0, T, C):
        end = min(c0 + C, T)
        t = torch.arange(c0, end, device=q.device)
        carry = g[..., 0] ** (end - c0) * (doc[:, end - 1] < c0).view(B, 1)  # [B, H]; 0 after a document start
        key_w = g ** (end - 1 - t) * (t >= doc[:, end - 1 : end]).view(B, 1, -1)  # keys of the last document
        query_w = g ** (t - c0 + 1) * (doc[:, c0:end] < c0).view(B, 1, -1)  # queries before a document start
        states.append(S)
        sums.append(z)
        kw = k[:, :, c0:end] * key_w[..., None]
        S = carry[..., None, None] * S + kw.transpose(-1, -2) @ v[:, :, c0:end]
        z = carry[..., None] * z + kw.sum(2)
        carries.append(carry[..., None, None])
        gains.append((q[:, :, c0:end] * query_w[..., None]).transpose(-1, -2) @ do[:, :, c0:end])
    dG = [torch.zeros_like(S)]
    for n in range(len(gains) - 1, 0, -1):
        dG.insert(0, carries[n] * dG[0] + gains[n])
    flat = lambda xs: torch.stack(xs, 2).flatten(0, 1)  # noqa: E731
    return flat(states), flat(sums), S.flatten(0, 1), z.flatten(0, 1), flat(dG)


def check_kernels_separately(B, T, H, K, V, C, dtype, tol, kernels=("states", "apply"), device="cpu"):
    """Each kernel on its own, with an incoming state, a partial chunk and a document start inside the
    second chunk (the first chunk carries the state on, the second sends dG back to the first): the
    forward state scan (S, z, final state) and the backward's S and dG scans (one launch) against the
    recurrences; the two scores passes and the four output passes, fed the exact states, against the
    torch path (o and row sums, dq, dk, dv)."""
    from retnet_train.kernels import triton_retention as mod

    lg = decay_log_gammas(H).to(device)
    q, k, v = inputs(B, T, H, K, V, device=device, seed=8)
    reset = torch.zeros(B, T, dtype=torch.bool, device=device)
    reset[:, C + C // 4] = True
    st = torch.randn(B, H, K, V + 1, device=device, generator=torch.Generator(device=device).manual_seed(6)) * 0.1
    do = torch.linspace(-1, 1, V, device=device, dtype=torch.float64).expand(B, T, H, V)  # run()'s output weights
    s0, z0 = st[..., :V].reshape(B * H, K, V), st[..., V].reshape(B * H, K).contiguous()
    S, z, fin, zfin, dG = reference_states(q, k, v, do, lg, C, reset, s0, z0)
    lg2 = (lg.float() * mod.LOG2E).contiguous()
    doc = mod.doc_starts(reset)
    q_, k_, v_, do_, s0_, S_, dG_ = (t.to(dtype).contiguous() for t in (q, k, v, do, s0, S, dG))
    got, ref = {}, {}
    if "states" in kernels:
        got.update(zip(["S", "z", "final S", "final z"], mod._states(k_, v_, lg2, C, doc, s0_, z0, True)))
        got.update(zip(["pair S", "pair dG"], mod._states_pair(q_, k_, v_, do_, lg2, C, doc, s0_)))
        ref.update({"S": S, "z": z, "final S": fin, "final z": zfin, "pair S": S, "pair dG": dG})
    if "apply" in kernels or "scores" in kernels:  # the scores pass feeds the output passes
        o, s, _, dq, dk, dv = run(torch_path(C, lg, reset), q, k, v, torch.float64, st.double())
        A, got["row sums"] = mod._scores(q_, k_, lg2, C, doc, Z=z.float().contiguous())
        dA = mod._scores(do_, v_, lg2, C, doc)[0]
        got["o"] = mod._apply(q_, v_, S_, A, lg2, C, False, False, doc)
        got["dq"] = mod._apply(do_, k_, S_, dA, lg2, C, False, True, doc)
        got["dk"] = mod._apply(v_, q_, dG_, dA, lg2, C, True, True, doc)
        got["dv"] = mod._apply(k_, do_, dG_, A, lg2, C, True, False, doc)
        ref.update({"o": o, "row sums": s, "dq": dq, "dk": dk, "dv": dv})
    assert_close(list(got.values()), [ref[name] for name in got], tol, names=list(got))


def with_blocks(kernels, fn, **meta):
    kernels.FIXED_META.update(meta)
    try:
        fn()
    finally:
        kernels.FIXED_META.clear()
