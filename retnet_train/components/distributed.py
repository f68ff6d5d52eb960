"""The device and the process group a run uses."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def pick_device(choice: str) -> torch.device:
    """train.device (auto | cpu | cuda) -> this rank's device."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but no CUDA/ROCm device is visible")
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def init_distributed(device: torch.device, timeout=None) -> None:
    """NCCL on GPU, gloo on CPU; `timeout` (a timedelta) for collectives, else the defaults. An
    existing process group is used as it is (several runs in one process)."""
    import deepspeed

    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {} if timeout is None else {"timeout": timeout}
    if not dist.is_initialized() and "RANK" not in os.environ:
        # A plain `python -m`: a world of one on an in-memory store, so no TCP port can collide
        # with another run on the machine.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    deepspeed.init_distributed(dist_backend=backend, **kwargs)  # wraps the group above, or joins torchrun's
