"""`--from-launcher-env`: the preflight started on every node by torchrun or the DeepSpeed launcher
(launch/deepspeed.sh has no other way to reach each node) takes node rank, node count and
processes per node from that launcher's variables; only local rank 0 of each node checks."""

from __future__ import annotations

import argparse

from .trainer_config import PreflightError


def _int_env(env: dict, name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise PreflightError(f"{name}={env[name]!r} is not an integer") from None


def apply_launcher_env(args: argparse.Namespace, env: dict) -> bool:
    """Fill node rank / node count / processes per node from torchrun's or DeepSpeed's variables.

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
        args.nnodes = _int_env(env, "WORLD_SIZE") // args.nproc_per_node
    else:
        raise PreflightError("--from-launcher-env: neither CROSS_RANK (deepspeed) nor GROUP_RANK (torchrun) is set")
    return True
