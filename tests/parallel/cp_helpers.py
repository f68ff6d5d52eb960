"""Run a function on P spawned ranks (torch.multiprocessing, FileStore: no TCP port); gloo on CPU,
or nccl with one GPU per rank."""

from __future__ import annotations

import json
import os
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, world, store_path, out_dir, backend, fn, args):
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        result = {"ok": True, "value": fn(rank, world, *args)}
    except Exception:
        result = {"ok": False, "error": traceback.format_exc()}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    # every rank past its last collective before any tears gloo down: a rank destroying its group while
    # the other's gloo thread still talks to it aborted once under load ("terminate called without an
    # active exception")
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(fn, world: int, tmp_path, *args, backend: str = "gloo") -> list:
    """fn(rank, world, *args) on `world` spawned ranks; its JSON-able return values by rank (raises on
    any rank's exception, with that rank's traceback)."""
    out = tmp_path / "results"
    out.mkdir(exist_ok=True)
    mp.spawn(_entry, args=(world, str(tmp_path / "store"), str(out), backend, fn, args), nprocs=world, join=True)
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    for r, res in enumerate(results):
        if not res["ok"]:
            raise AssertionError(f"rank {r} failed:\n{res['error']}")
    return [res["value"] for res in results]
