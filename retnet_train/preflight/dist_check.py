"""`--dist-check`: under torchrun (or launch/torchrun.sh --module retnet_train.preflight), an
all_reduce and all_gather across every rank on every node (nccl/rccl on GPU, gloo on CPU), so a
broken interconnect, firewall or rendezvous shows in seconds instead of as a hang in the first
training step. Separate from the node checks: it needs the launcher's process group."""

from __future__ import annotations

import os
import socket
import sys


def dist_check(timeout_s: float = 120.0) -> int:
    """all_reduce and all_gather across the ranks torchrun started; rank 0 prints the result."""
    import datetime

    import torch
    import torch.distributed as dist

    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            print(f"preflight --dist-check: {var} is unset: run under torchrun or launch/torchrun.sh", file=sys.stderr)
            return 2
    use_gpu = torch.cuda.is_available()
    if use_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if use_gpu else "gloo"
    device_id = torch.device("cuda", torch.cuda.current_device()) if use_gpu else None
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), device_id=device_id)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
        t = torch.tensor([float(rank + 1)], device=device)
        dist.all_reduce(t)
        hosts: list = [None] * world
        dist.all_gather_object(hosts, f"{socket.gethostname()}:{os.getpid()}")
        expect = world * (world + 1) / 2
        if t.item() != expect:
            print(
                f"preflight --dist-check: rank {rank}: all_reduce gave {t.item()}, expected {expect}", file=sys.stderr
            )
            return 1
        dist.barrier()
        if rank == 0:
            print(
                f"dist-check ok: backend={backend} world_size={world} all_reduce={t.item():g} ranks={hosts}", flush=True
            )
        return 0
    finally:
        dist.destroy_process_group()
