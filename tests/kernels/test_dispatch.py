"""retention_op's choice of path: what the Triton kernels cannot do runs on the torch path; resolve_backend
refuses the GPU backends on a CPU."""

import sys
import types

import pytest
import torch

from retnet_train import kernels
from retnet_train.model.retnet import decay_log_gammas


@pytest.fixture
def calls(monkeypatch):
    """Records which path retention_op takes; the Triton module is a stand-in (no GPU here)."""
    seen = []
    fake = types.ModuleType("retnet_train.kernels.triton_retention")
    fake.supported = lambda C, K, V: C % 16 == 0 and K % 16 == 0 and V % 16 == 0
    fake.triton_retention = lambda *a: seen.append("triton")
    monkeypatch.setitem(sys.modules, "retnet_train.kernels.triton_retention", fake)
    real = kernels._torch_op
    monkeypatch.setattr(kernels, "_torch_op", lambda *a: (seen.append("torch"), real(*a))[1])
    return seen


def run(reset=None, chunk=32, state_grad=False, mode="chunkwise", state=None):
    q, k, v = torch.randn(1, 64, 2, 16), torch.randn(1, 64, 2, 16), torch.randn(1, 64, 2, 16)
    kernels.retention_op("triton", q, k, v, decay_log_gammas(2), mode, chunk, reset, state, True, state_grad=state_grad)


def test_triton_takes_what_it_can(calls):
    run()
    run(mode="parallel")
    run(reset=torch.zeros(1, 64, dtype=torch.bool))
    assert calls == ["triton"] * 3


def test_torch_takes_odd_chunks_decoding_and_state_gradients(calls):
    run(chunk=24)
    run(mode="recurrent")
    run(state_grad=True)  # context parallel: the kernels give the final state no gradient
    assert calls == ["torch"] * 3


def test_an_incoming_state_with_a_gradient_runs_on_torch(calls):
    """The kernels give an incoming state no gradient: a state that wants one (a state handed on under
    autograd) takes the torch path, which gives it; a state without one stays on the kernels."""
    run(state=torch.zeros(1, 2, 16, 17))
    run(state=torch.zeros(1, 2, 16, 17, requires_grad=True))
    assert calls == ["triton", "torch"]


def test_triton_refuses_gpu_key_dims_its_gpu_test_does_not_cover(monkeypatch):
    """A CUDA tensor with K > 256 (wider than the GPU tests go) must not reach the Triton kernels."""
    q = torch.randn(1, 64, 2, 512)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with pytest.raises(ValueError, match="retention_backend=triton: key head dim 512 is wider than the GPU tests"):
        kernels.retention_op("triton", q, q, torch.randn(1, 64, 2, 512), decay_log_gammas(2), "chunkwise", 64)


@pytest.mark.parametrize("backend", ["triton", "fla"])
def test_gpu_backends_refuse_cpu(backend):
    from retnet_train.kernels import resolve_backend

    with pytest.raises(ValueError, match=f"model.retention_backend={backend} needs a CUDA or ROCm device"):
        resolve_backend(backend, torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


@pytest.mark.parametrize(
    "hip, key_dim, fla, expected",
    [
        (None, 256, True, "triton"),  # NVIDIA, a key dim the Triton kernels' GPU tests cover
        (None, 512, True, "fla"),  # wider: fla where installed
        (None, 512, False, "torch"),
        ("6.2", 256, True, "fla"),  # ROCm: the Triton kernels' GPU tests ran on NVIDIA only
        ("6.2", 256, False, "torch"),
    ],
)
def test_auto_prefers_the_triton_kernels_on_nvidia(monkeypatch, hip, key_dim, fla, expected):
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    monkeypatch.setattr(kernels, "fla_available", lambda: fla)
    assert kernels.resolve_backend("auto", torch.device("cuda"), key_dim) == expected


@pytest.mark.parametrize("backend", ["triton", "fla"])
@pytest.mark.parametrize("hip", [None, "6.2"])
def test_an_explicit_gpu_backend_runs_where_it_is_available(monkeypatch, backend, hip):
    """retention_backend=triton or fla on a GPU is what runs (on ROCm too, and at any key dim: `auto`
    alone chooses), or is refused naming what to install; never silently the torch path."""
    monkeypatch.setattr(torch.version, "hip", hip)
    for name in ("triton", "fla"):
        monkeypatch.setitem(kernels.GPU_BACKENDS, name, (lambda: True, kernels.GPU_BACKENDS[name][1]))
    assert kernels.resolve_backend(backend, torch.device("cuda"), 512) == backend
    missing = kernels.GPU_BACKENDS[backend][1]
    monkeypatch.setitem(kernels.GPU_BACKENDS, backend, (lambda: False, missing))
    with pytest.raises(ValueError, match=f"model.retention_backend={backend} needs"):
        kernels.resolve_backend(backend, torch.device("cuda"), 64)
