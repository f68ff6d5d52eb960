"""keep_state: the torch chunkwise and parallel forms sum a bf16 final state exactly in fp32 only when
the caller uses it; without it (training) they return the scan's last row cast to fp32. The exact
path's precision: test_torch_retention.test_bf16_final_state_is_fp32_in_every_form."""

import pytest
import torch

import retnet_train.kernels.torch_retention as tr
from retnet_train.kernels import retention_op
from retnet_train.model.retnet import decay_log_gammas

B, H, K, V, C = 2, 4, 16, 32, 16


def bf16_inputs(T, state=False, reset=False):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, d, generator=g) for d in (K, K, V))
    q, k, v = q.bfloat16(), (k * K**-0.5).bfloat16(), v.bfloat16()
    s = torch.randn(B, H, K, V, generator=g) if state else None  # fp32, as a prefill hands it on
    r = (torch.rand(B, T, generator=g) < 0.02) if reset else None
    return q, k, v, decay_log_gammas(H), r, s


def count_final_state(monkeypatch):
    """Counts the calls of the exact fp32 re-sum (_final_state)."""
    calls = []
    real = tr._final_state
    monkeypatch.setattr(tr, "_final_state", lambda *a: (calls.append(1), real(*a))[1])
    return calls


@pytest.mark.parametrize("state,reset", [(False, False), (True, True)])
def test_cheap_final_state_is_the_scans_last_row(monkeypatch, state, reset):
    """keep_state=False: the final state is states[:, :, N] cast to fp32, bit for bit, without the
    fp32 re-sum; o is the same as with keep_state=True."""
    q, k, v, lg, r, s = bf16_inputs(8 * C, state, reset)
    calls = count_final_state(monkeypatch)
    o, final, _ = tr.chunk_forward(q, k, v, lg, r, s, C, keep_state=False)
    assert calls == []
    N, _, _, k_decay, W = tr._chunk_setup(q, lg, r, C)
    states = tr._chunk_states(tr._chunks(k, C), tr._chunks(v, C), k_decay, W, s)[0]
    assert final.dtype == torch.float32
    assert torch.equal(final, states[:, :, N].float())
    o_exact, final_exact, _ = tr.chunk_forward(q, k, v, lg, r, s, C, keep_state=True)
    assert calls == [1]
    assert torch.equal(o, o_exact)
    assert not torch.equal(final, final_exact)  # the exact one is not rounded to bf16


@pytest.mark.parametrize("mode", ["parallel", "chunkwise"])
def test_retention_op_without_keep_state_skips_the_resum(monkeypatch, mode):
    """Through retention_op (row sums on, ChunkRetention's recompute path, its backward): no re-sum,
    the state stays fp32 with its row-sum column, and the gradients flow."""
    q, k, v, lg, _, _ = bf16_inputs(4 * C)
    q, k, v = (t.transpose(1, 2).requires_grad_() for t in (q, k, v))  # retention_op's [B, T, H, D]
    calls = count_final_state(monkeypatch)
    o, _, final = retention_op("torch", q, k, v, lg, mode, C, keep_state=False)
    assert calls == []
    assert final.dtype == torch.float32 and final.shape == (B, H, K, V + 1)
    o.float().square().sum().backward()
    assert all(t.grad is not None for t in (q, k, v))
    retention_op("torch", q, k, v, lg, mode, C)  # the default: exact
    assert calls == [1]


def test_trailing_partial_chunk_starts_from_the_exact_state(monkeypatch):
    """A last partial chunk continues from the full chunks' exact state whatever keep_state, so o does
    not depend on it; only that hand-off runs the re-sum."""
    q, k, v, lg, _, _ = bf16_inputs(5 * C + 7)
    calls = count_final_state(monkeypatch)
    o, final = tr.chunkwise_retention(q, k, v, lg, C, keep_state=False)
    assert len(calls) == 1
    o_exact, final_exact = tr.chunkwise_retention(q, k, v, lg, C)
    assert len(calls) == 3
    assert torch.equal(o, o_exact)
    assert final.dtype == torch.float32
    assert (final - final_exact).abs().max() <= 2**-7 * final_exact.abs().max()  # bf16 rounding
