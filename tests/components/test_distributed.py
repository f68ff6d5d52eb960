"""pick_device: train.device resolved on this machine, and a precision that device cannot train in
refused naming the key."""

import pytest
import torch

from retnet_train.components.distributed import pick_device


def test_fp16_without_a_gpu_is_refused_naming_deepspeed_precision(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    remedy = "bf16, bf16-mixed and fp32 run on CPU"
    with pytest.raises(ValueError) as exc:
        pick_device("cpu", "fp16")
    assert str(exc.value) == f"deepspeed.precision=fp16 needs a GPU, and train.device=cpu: {remedy}"
    with pytest.raises(ValueError) as exc:
        pick_device("auto", "fp16")
    assert str(exc.value) == (
        f"deepspeed.precision=fp16 needs a GPU, and none is visible (train.device=auto): {remedy}"
    )
    for precision in ("bf16", "bf16-mixed", "fp32"):
        assert pick_device("cpu", precision) == pick_device("auto", precision) == torch.device("cpu")
