"""`--from-launcher-env`: the preflight started on every node by torchrun or the DeepSpeed launcher
(launch/deepspeed.sh has no other way to reach each node) takes node rank, node count, processes
per node and the world size from that launcher's variables; only local rank 0 of each node checks.
The launcher's WORLD_SIZE is the world size: nodes may start different numbers of processes."""

from __future__ import annotations

import argparse

from .trainer_config import PreflightError


def _int_env(env: dict, name: str) -> int:
    if name not in env:
        raise PreflightError(f"--from-launcher-env: {name} is unset")
    try:
        return int(env[name])
    except ValueError:
        raise PreflightError(f"{name}={env[name]!r} is not an integer") from None


def apply_launcher_env(args: argparse.Namespace, env: dict) -> bool:
    """Fill node rank / node count / processes per node / world size from torchrun's or DeepSpeed's variables.

    Returns False for processes other than local rank 0 (they have nothing to check).
    """
    if "LOCAL_RANK" not in env:
        raise PreflightError("--from-launcher-env: LOCAL_RANK is unset (not started by torchrun or deepspeed)")
    if _int_env(env, "LOCAL_RANK") != 0:
        return False
    if "CROSS_RANK" in env:  # deepspeed.launcher.launch
        args.node_rank, args.nnodes = _int_env(env, "CROSS_RANK"), _int_env(env, "CROSS_SIZE")
        args.nproc_per_node = _int_env(env, "LOCAL_SIZE")
    elif "GROUP_RANK" in env:  # torchrun
        args.nproc_per_node = _int_env(env, "LOCAL_WORLD_SIZE")
        args.node_rank = _int_env(env, "GROUP_RANK")
        args.nnodes = _int_env(env, "GROUP_WORLD_SIZE")  # (WORLD_SIZE // LOCAL_WORLD_SIZE: equal nodes only)
    else:
        raise PreflightError("--from-launcher-env: neither CROSS_RANK (deepspeed) nor GROUP_RANK (torchrun) is set")
    args.world_size = _int_env(env, "WORLD_SIZE")
    return True
