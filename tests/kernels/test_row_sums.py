import pytest
import torch

from retnet_train.kernels import _torch_op
from retnet_train.kernels.row_sums import retention_row_sums
from retnet_train.model.retnet import decay_log_gammas


@pytest.mark.parametrize("T,chunk", [(1, 4), (37, 8), (64, 16), (200, 64)])
@pytest.mark.parametrize("with_resets", [False, True])
def test_row_sums_equal_the_reference_path(T, chunk, with_resets):
    B, H, K = 2, 3, 8
    q, k, v = torch.randn(B, T, H, K), torch.randn(B, T, H, K) * K**-0.5, torch.randn(B, T, H, 4)
    reset = None
    if with_resets:
        reset = torch.rand(B, T) < 0.08
        reset[1, -1] = True
    lg = decay_log_gammas(H)
    _, ref_s, ref_state = _torch_op(q, k, v, lg, "parallel", chunk, reset, None, True)
    s, z = retention_row_sums(q, k, lg, chunk, reset)
    assert (s - ref_s).abs().max() < 1e-4 * max(1.0, ref_s.abs().max().item())
    assert (z - ref_state[..., -1]).abs().max() < 1e-4
