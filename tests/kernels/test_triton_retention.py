"""Triton backend vs the torch reference on GPU (pytest -m gpu): bf16 at the presets' head dims
against the fp32 torch path, 2e-2, every autotuning candidate of each kernel; fp32 against fp64,
1e-4. On CPU: doc_starts here, the kernels themselves under the interpreter in
test_triton_interpreter.py."""

import pytest
import torch
from triton_helpers import (
    BF16_TOL,
    FP32_TOL,
    assert_close,
    check_kernels_separately,
    inputs,
    resets,
    run,
    torch_path,
    triton_path,
    with_blocks,
)

from retnet_train.model.retnet import decay_log_gammas


def test_doc_starts():
    from retnet_train.kernels.triton_retention import doc_starts

    reset = torch.tensor([[False, False, True, False, True], [True, False, False, False, False]])
    assert doc_starts(reset).tolist() == [[-1, -1, 2, 2, 4], [0, 0, 0, 0, 0]]


def test_scan_segments_setting(monkeypatch):
    """A count is taken as given; `auto` splits the forward scan only where its programs at 64 x 128
    tiles would leave an SM with fewer than two (an H200's 132 SMs: K 256 / V 512, 8 heads, batch 1);
    anything else is refused, naming the variable."""
    from retnet_train.kernels import triton_retention_launch as kernels

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(kernels, "_sm_count", lambda index: 132)
    monkeypatch.setattr(kernels, "SCAN_SEGMENTS", "3")
    assert kernels.scan_segments(8 * 256 * 512, 32, gpu) == 3
    monkeypatch.setattr(kernels, "SCAN_SEGMENTS", "auto")
    assert kernels.scan_segments(1 * 8 * 256 * 512, 32, gpu) == 2
    assert kernels.scan_segments(2 * 8 * 256 * 512, 32, gpu) == 1
    assert kernels.scan_segments(1 * 8 * 128 * 256, 32, gpu) == 4  # 32 programs; at most 4 segments
    assert kernels.scan_segments(1 * 8 * 128 * 256, 8, gpu) == 2  # at least 4 chunks each
    assert kernels.scan_segments(1 * 8 * 256 * 512, 32, torch.device("cpu")) == 1
    for bad in ("0", "two"):
        monkeypatch.setattr(kernels, "SCAN_SEGMENTS", bad)
        with pytest.raises(ValueError, match="RETNET_TRITON_SCAN_SEGMENTS"):
            kernels.scan_segments(8 * 256 * 512, 32, gpu)


def test_scan_split_leaves_no_segment_empty():
    """(chunks per segment, segments): 7 chunks asked into 1, 2, 3, 4, 7 (the interpreter's
    check_scan_segments) and 9 segments; 5 chunks into 4 make 3 segments of 2, 2 and 1."""
    from retnet_train.kernels.scan_split import scan_split

    assert [scan_split(7, s) for s in (1, 2, 3, 4, 7, 9)] == [(7, 1), (4, 2), (3, 3), (2, 4), (1, 7), (1, 7)]
    assert scan_split(5, 4) == (2, 3)


# ---- GPU ------------------------------------------------------------------------------------------
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA/ROCm")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(
    "T,C,K,V,docs", [(2048, 256, 256, 512, False), (2000, 128, 256, 512, True), (1024, 64, 128, 256, True)]
)
def test_triton_bf16_matches_torch_fp32_gpu(T, C, K, V, docs):
    B, H = 2, 4
    lg = decay_log_gammas(H).cuda()
    q, k, v = inputs(B, T, H, K, V, device="cuda")
    reset = resets(B, T, C, device="cuda") if docs else None
    st = torch.randn(B, H, K, V + 1, device="cuda") * 0.1
    ref = run(torch_path(C, lg, reset), q, k, v, torch.float32, st)
    got = run(triton_path(C, lg, reset), q, k, v, torch.bfloat16, st.bfloat16())
    assert_close(got, ref, BF16_TOL)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("kernel", ["states", "scores", "apply"])
def test_triton_every_config_gpu(kernel):
    """Every autotuning candidate of a kernel (the autotuner picks by time, so any may run) at the
    widest heads, bf16, each kernel on its own: a failure names the config and the outputs it got wrong."""
    from retnet_train.kernels import triton_retention_launch as kernels

    failures = []
    for cfg in kernels.KERNELS[kernel][2]:
        case = lambda: check_kernels_separately(1, 512, 2, 256, 512, 256, torch.bfloat16, BF16_TOL, (kernel,), "cuda")  # noqa: B023, E731
        try:
            with_blocks(kernels, case, **{kernel: cfg.kwargs})
        except AssertionError as e:
            failures.append(f"{cfg}: {e}")
    assert not failures, "\n".join(failures)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("segments", [2, 3, 4])
def test_triton_scan_segments_gpu(segments):
    """The forward scan in segments (what batch 1 runs at the widest heads), with document starts."""
    from retnet_train.kernels import triton_retention_launch as kernels

    B, T, H, K, V, C = 1, 2000, 8, 256, 512, 128
    lg = decay_log_gammas(H).cuda()
    q, k, v = inputs(B, T, H, K, V, device="cuda")
    reset = resets(B, T, C, device="cuda")
    st = torch.randn(B, H, K, V + 1, device="cuda") * 0.1
    ref = run(torch_path(C, lg, reset), q, k, v, torch.float32, st)
    saved, kernels.SCAN_SEGMENTS = kernels.SCAN_SEGMENTS, segments
    try:
        got = run(triton_path(C, lg, reset), q, k, v, torch.bfloat16, st.bfloat16())
    finally:
        kernels.SCAN_SEGMENTS = saved
    assert_close(got, ref, BF16_TOL)


@pytest.mark.gpu
@needs_gpu
def test_triton_fp32_matches_torch_fp64_gpu():
    B, T, H, K, V, C = 1, 640, 2, 128, 256, 128
    lg = decay_log_gammas(H).cuda()
    q, k, v = inputs(B, T, H, K, V, device="cuda")
    reset = resets(B, T, C, device="cuda")
    ref = run(torch_path(C, lg, reset), q, k, v, torch.float64)
    assert_close(run(triton_path(C, lg, reset), q, k, v, torch.float32), ref, FP32_TOL)
