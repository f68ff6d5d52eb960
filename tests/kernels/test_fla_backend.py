"""fla backend vs the torch reference on GPU, bf16 (pytest -m gpu). Tolerance: the max abs
error relative to the output's max magnitude, 2e-2 for outputs and gradients (bf16 has 8 bits
of mantissa; both are compared with an fp32 torch reference)."""

import pytest
import torch

from retnet_train.kernels import fla_available, retention_op
from retnet_train.model import RetNetConfig, RetNetForCausalLM
from retnet_train.model.retnet import decay_log_gammas

pytestmark = pytest.mark.gpu
needs_fla = pytest.mark.skipif(
    not (torch.cuda.is_available() and fla_available()), reason="needs CUDA/ROCm and fla-core"
)
TOL = 2e-2


def rel_err(a, ref):
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-6)).item()


def make_inputs(B, T, H, K, V, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, T, H, K, device="cuda", generator=g)
    k = torch.randn(B, T, H, K, device="cuda", generator=g) * K**-0.5
    v = torch.randn(B, T, H, V, device="cuda", generator=g)
    return q, k, v


def run(backend, q, k, v, dtype, reset=None, state=None, mode="chunkwise"):
    leaves = [t.to(dtype).clone().requires_grad_() for t in (q, k, v)]
    lg = decay_log_gammas(q.shape[2]).cuda()
    o, s, final = retention_op(backend, *leaves, lg, mode, 64, reset, state, True)
    (o.float() * torch.linspace(-1, 1, o.shape[-1], device="cuda")).sum().backward()
    return o, s, final, [t.grad for t in leaves]


@needs_fla
@pytest.mark.parametrize("K,V", [(64, 128), (256, 512)])
@pytest.mark.parametrize("with_docs", [False, True])
def test_fla_matches_torch_forward_backward(K, V, with_docs):
    B, T, H = 2, 1000, 4
    q, k, v = make_inputs(B, T, H, K, V)
    reset = None
    if with_docs:
        reset = torch.zeros(B, T, dtype=torch.bool, device="cuda")
        reset[0, [100, 101, 640]] = True
        reset[1, [999]] = True
    ref = run("torch", q, k, v, torch.float32, reset)
    got = run("fla", q, k, v, torch.bfloat16, reset)
    assert rel_err(got[0], ref[0]) < TOL
    assert rel_err(got[1], ref[1]) < TOL  # row sums
    assert rel_err(got[2], ref[2]) < TOL  # final state incl. the row-sum column
    for a, b in zip(got[3], ref[3]):
        assert rel_err(a, b) < TOL


@needs_fla
def test_fla_state_continuation_and_recurrent_decode():
    B, T, H, K, V = 2, 300, 4, 64, 128
    q, k, v = make_inputs(B, T, H, K, V, seed=1)
    ref_o = run("torch", q, k, v, torch.float32)[0]
    with torch.no_grad():
        lg = decay_log_gammas(H).cuda()
        bf = [t.bfloat16() for t in (q, k, v)]
        o1, _, st = retention_op("fla", *(t[:, :200] for t in bf), lg, "chunkwise", 64, None, None, True)
        o2, _, st = retention_op("fla", *(t[:, 200:299] for t in bf), lg, "chunkwise", 64, None, st, True)
        o3, _, _ = retention_op("fla", *(t[:, 299:] for t in bf), lg, "recurrent", 64, None, st, True)
    assert rel_err(torch.cat([o1, o2, o3], 1), ref_o) < TOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA/ROCm")
@needs_fla
def test_model_backends_agree_bf16():
    cfg = dict(vocab_size=512, d_model=256, n_layers=2, n_heads=2, ffn_dim=512)
    torch.manual_seed(0)
    ref = RetNetForCausalLM(RetNetConfig(**cfg, retention_backend="torch")).cuda()
    fast = RetNetForCausalLM(RetNetConfig(**cfg, retention_backend="fla")).cuda()
    fast.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 512, (2, 700), device="cuda")
    starts = torch.rand(2, 700, device="cuda") < 0.01
    losses, grads = [], []
    for model, dtype in ((ref, torch.float32), (fast, torch.bfloat16)):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
            out = model(ids, labels=ids, doc_starts=starts, return_logits=False)
        out.loss.backward()
        losses.append(out.loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert abs(losses[0] - losses[1]) < 2e-2 * losses[0]
    assert rel_err(grads[1], grads[0]) < 5e-2


@needs_fla
def test_fla_model_is_causal_at_paper_head_dims():
    """Key head dim 256, value head dim 512 (the paper's), bf16: no information from the future."""
    cfg = RetNetConfig(vocab_size=512, d_model=512, n_layers=2, n_heads=2, ffn_dim=1024, retention_backend="fla")
    model = RetNetForCausalLM(cfg).cuda().bfloat16().eval()
    ids = torch.randint(0, 512, (1, 4096), device="cuda")
    changed = ids.clone()
    changed[:, 3000:] = (changed[:, 3000:] + 1) % 512
    with torch.no_grad():
        a, b = model(ids).logits.float(), model(changed).logits.float()
    assert (a[:, :3000] - b[:, :3000]).abs().max() == 0
    assert (a[:, 3000:] - b[:, 3000:]).abs().max() > 1e-2
