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


@pytest.mark.parametrize("backend", ["triton", "fla"])
def test_a_gpu_retention_backend_without_a_gpu_is_refused_naming_the_key(monkeypatch, backend):
    """The model refused it only at its first forward, after the engine was built and the run dir written."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    remedy = "model.retention_backend=auto or torch run on CPU"
    with pytest.raises(ValueError) as exc:
        pick_device("cpu", "fp32", backend)
    assert (
        str(exc.value)
        == f"model.retention_backend={backend} needs a CUDA or ROCm device, and train.device=cpu: {remedy}"
    )
    with pytest.raises(ValueError) as exc:
        pick_device("auto", "bf16", backend)
    assert str(exc.value) == (
        f"model.retention_backend={backend} needs a CUDA or ROCm device, and none is visible (train.device=auto): "
        f"{remedy}"
    )
    for other in ("auto", "torch", None):  # None: a model without retention (the Transformer)
        assert pick_device("cpu", "fp32", other) == pick_device("auto", "fp32", other) == torch.device("cpu")


def test_cpu_init_builds_no_deepspeed_shm_op(tmp_path):
    """DeepSpeed's CPU shared-memory all-reduce (its inference path) is not compiled at a CPU start: it
    cost ~20 s on a fresh machine and printed compiler lines. Collectives still run, through gloo."""
    import subprocess
    import sys

    code = """
import torch, torch.distributed as dist
import deepspeed.comm.comm as ds_comm
from retnet_train.components.distributed import init_distributed
init_distributed(torch.device("cpu"))
t = torch.ones(2)
dist.all_reduce(t)
print(ds_comm.cdb.shm_comm_op, t.tolist())
"""
    env = {**__import__("os").environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(key, None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "None [1.0, 1.0]"
    assert not (tmp_path / "ext").exists() and "gcc" not in out.stdout + out.stderr
