"""Context parallelism with fla's kernels (pytest -m gpu; not runnable on CPU). The CPU tests prove the
exchange and correction with the torch backend; on GPU the remaining questions are whether fla's
final state carries its gradient (the state exchange depends on it) and the whole model over NCCL."""

import pytest
import torch
import torch.distributed as dist
from cp_helpers import run_ranks

from retnet_train.kernels import fla_available, retention_op
from retnet_train.model import RetNetConfig, RetNetForCausalLM
from retnet_train.model.retnet import decay_log_gammas
from retnet_train.parallel import build_context_parallel, parallelize

pytestmark = pytest.mark.gpu
needs_fla = pytest.mark.skipif(
    not (torch.cuda.is_available() and fla_available()), reason="needs CUDA/ROCm and fla-core"
)
needs_2 = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
TOL = 2e-2


def rel_err(a, ref):
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-6)).item()


@needs_fla
@pytest.mark.parametrize("with_docs", [False, True])
def test_fla_final_state_gradient_matches_torch(with_docs):
    B, T, H, K, V = 2, 700, 4, 64, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, v = (torch.randn(B, T, H, D, device="cuda", generator=g) for D in (K, V))
    k = torch.randn(B, T, H, K, device="cuda", generator=g) * K**-0.5
    reset = None
    if with_docs:
        reset = torch.zeros(B, T, dtype=torch.bool, device="cuda")
        reset[0, [100, 640]] = True
    w_o = torch.randn(V, device="cuda", generator=g)
    w_s = torch.randn(K, V, device="cuda", generator=g)
    grads = {}
    for backend, dtype in (("torch", torch.float32), ("fla", torch.bfloat16)):
        leaves = [t.to(dtype).clone().requires_grad_() for t in (q, k, v)]
        o, _, final = retention_op(backend, *leaves, decay_log_gammas(H).cuda(), "chunkwise", 64, reset, None, True)
        # a loss on the final state alone exercises its backward (what the state exchange relies on)
        ((o.float() * w_o).sum() * 1e-3 + (final[..., :V].float() * w_s).sum()).backward()
        grads[backend] = [t.grad for t in leaves]
    for a, b in zip(grads["fla"], grads["torch"]):
        assert rel_err(a, b) < TOL


def _fla_cp_vs_one_rank(rank, world):
    cp, _, _ = build_context_parallel(world, rank, world, 512)
    torch.manual_seed(0)
    model = RetNetForCausalLM(
        RetNetConfig(vocab_size=256, d_model=256, n_layers=2, n_heads=2, ffn_dim=512, retention_backend="fla")
    ).cuda()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (1, 513), generator=g).cuda()
    starts = torch.zeros(1, 512, dtype=torch.bool, device="cuda")
    starts[0, [100, 256, 300]] = True  # one exactly at the rank boundary
    ids, labels = ids[:, :-1], ids[:, 1:]
    out = model(ids, labels=labels, doc_starts=starts)
    out.loss.backward()
    ref = [out.loss.detach()] + [p.grad.clone() for p in model.parameters()]
    model = parallelize(model, context_parallel=cp)
    model.zero_grad(set_to_none=True)
    out = model(cp.shard(ids), labels=cp.shard(labels), doc_starts=cp.shard(starts))
    out.loss.backward()
    got = [out.loss.detach()] + [p.grad.clone() for p in model.parameters()]
    for t in got:
        dist.all_reduce(t)
    return max(rel_err(a / world, b) for a, b in zip(got, ref))


@needs_fla
@needs_2
def test_fla_context_parallel_on_two_gpus_equals_one(tmp_path):
    errs = run_ranks(_fla_cp_vs_one_rank, 2, tmp_path, backend="nccl")
    assert max(errs) < 5e-3, errs  # fp32 model; fla may use tf32 dots, chunked differently on each side
