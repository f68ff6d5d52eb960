"""Validation loss: the token-weighted mean next-token loss over batches, for the trainer's periodic
evaluation and for evaluating a checkpoint (retnet_train.inference.evaluate)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from ..parallel import loss_weight


@dataclass
class MeanLoss:
    loss: float  # nan when no token was evaluated
    tokens: int  # tokens with a label, over all ranks when summed over ranks
    batches: int  # batches this rank ran


@torch.no_grad()
def mean_loss(
    model, batches: Iterable[dict], device, max_batches: Optional[int] = None, cp=None, sum_over_ranks: bool = False
) -> MeanLoss:
    """Mean loss of `model` (a model or DeepSpeed engine) over `batches` (input_ids, labels, doc_starts),
    each batch weighted by its labelled tokens, in eval mode (restored after).

    cp: this rank's context-parallel group (each rank runs its share of every sequence);
    sum_over_ranks: every rank of the process group calls this, and the mean is over all of them."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [loss x tokens, tokens]
    n = 0
    try:
        for batch in itertools.islice(batches, max_batches):
            batch = {k: v.to(device) for k, v in batch.items()}
            if cp is not None:
                batch = cp.shard_batch(batch)
            tokens = loss_weight(cp, batch["labels"])  # tokens this rank's loss stands for
            total += torch.stack([model(**batch, return_logits=False).loss.double() * tokens, tokens.double()])
            n += 1
    finally:
        model.train(was_training)
    if sum_over_ranks and dist.is_initialized():
        dist.all_reduce(total)
    loss_sum, tokens = total.tolist()
    return MeanLoss(loss_sum / tokens if tokens else float("nan"), int(round(tokens)), n)
