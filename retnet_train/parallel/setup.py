"""Trainer-side helpers: rank layout of context parallelism and token-weighted means."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

from ..components.config import check_layout
from .context import ContextParallel


def build_context_parallel(
    size: int, rank: int, world: int, seq_len: int
) -> Tuple[Optional[ContextParallel], int, int]:
    """(cp or None, data-parallel rank, data-parallel world). Consecutive ranks form a group: on one
    node when P divides the GPUs per node, where the per-layer state exchange is fastest. Every rank
    creates every group, in the same order (torch.distributed requires it)."""
    check_layout(size, world, seq_len)
    if size == 1:
        return None, rank, world
    mine = None
    for first in range(0, world, size):
        ranks = list(range(first, first + size))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return ContextParallel(mine, rank % size, size), rank // size, world // size


def loss_weight(cp: Optional[ContextParallel], labels: torch.Tensor) -> torch.Tensor:
    """How many tokens this rank's loss stands for in a token-weighted mean over ranks. Under context
    parallel a rank's loss is P * (its token-loss sum) / (the group's tokens), so each rank weighs
    group tokens / P and the weighted sum is the group's token-loss sum."""
    n = (labels != -100).sum()
    if cp is None:
        return n
    n = n.clone()
    dist.all_reduce(n, group=cp.group)
    return n.double() / cp.size
