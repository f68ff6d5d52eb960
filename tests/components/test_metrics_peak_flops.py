"""The peak MFU divides by is that of one torch device: on an MI250X a device is one of the package's two
GCDs (launch/README.md), each with half the package's 383 TFLOP/s of dense bf16."""

import pytest
import torch

from retnet_train.components.metrics import device_peak_flops, mfu


@pytest.mark.parametrize("name", ["AMD Instinct MI250X", "AMD Instinct MI250X / MI250"])
def test_an_mi250x_device_is_one_gcd(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: name)
    peak = device_peak_flops(torch.device("cuda", 0), None)
    assert peak == 191.5e12
    # 8 GCDs (4 packages) of a node running 100,000 tokens/s of a model of 6e9 FLOPs per token: 6e14 FLOP/s
    # of the node's 8 x 191.5e12
    assert mfu(100_000.0, 6e9, peak, world=8) == pytest.approx(6e14 / (8 * 191.5e12))
