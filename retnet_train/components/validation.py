"""Validation loss: the token-weighted mean next-token loss over batches, overall and per source, for
the trainer's periodic evaluation and for evaluating a checkpoint (retnet_train.inference.evaluate)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from ..parallel import loss_weight


def evaluation_due(step: int, eval_interval: int, max_steps: int) -> bool:
    """Validation runs every eval_interval optimizer steps and at the last one; eval_interval 0: never."""
    return eval_interval > 0 and (step % eval_interval == 0 or step == max_steps)


@dataclass
class MeanLoss:
    loss: float  # nan when no token was evaluated
    tokens: int  # tokens with a label, over all ranks when summed over ranks
    batches: int  # batches this rank ran
    by_source: dict[str, MeanLoss] = field(default_factory=dict)  # each named source's batches alone


@torch.no_grad()
def mean_loss(
    model,
    batches: Iterable[dict],
    device,
    max_batches: Optional[int] = None,
    cp=None,
    sum_over_ranks: bool = False,
    sources: Optional[Sequence[str]] = None,
) -> MeanLoss:
    """Mean loss of `model` (a model or DeepSpeed engine) over `batches` (input_ids, labels, doc_starts),
    each batch weighted by its labelled tokens, in eval mode (restored after).

    cp: this rank's context-parallel group (each rank runs its share of every sequence);
    sum_over_ranks: every rank of the process group calls this, and the mean is over all of them
    (every rank must name the same sources in the same order: ValidationLoader.batch_sources does);
    sources: the source of each batch (ValidationLoader.batch_sources): `by_source` has its mean."""
    if sources is not None and hasattr(batches, "__len__") and len(sources) != len(batches):
        raise ValueError(f"mean_loss: sources names {len(sources)} batches, batches has {len(batches)}")
    names = list(dict.fromkeys(sources)) if sources is not None else [None]
    row = {name: i for i, name in enumerate(names)}
    total = torch.zeros(len(names), 2, dtype=torch.float64, device=device)  # per source [loss x tokens, tokens]
    counts = [0] * len(names)
    was_training = model.training
    model.eval()
    try:
        named = zip(sources if sources is not None else itertools.repeat(None), batches)
        for name, batch in itertools.islice(named, max_batches):
            batch = {k: v.to(device) for k, v in batch.items()}
            if cp is not None:
                batch = cp.shard_batch(batch)
            tokens = loss_weight(cp, batch["labels"])  # tokens this rank's loss stands for
            loss = model(**batch, return_logits=False).loss.double()
            total[row[name]] += torch.stack([loss * tokens, tokens.double()])
            counts[row[name]] += 1
    finally:
        model.train(was_training)
    if sum_over_ranks and dist.is_initialized():
        dist.all_reduce(total)  # one collective for all sources: every rank gets the same numbers
    per_source = [_mean(loss_sum, tokens, n) for (loss_sum, tokens), n in zip(total.tolist(), counts)]
    overall = _mean(*total.sum(0).tolist(), sum(counts))
    if sources is not None:
        overall.by_source = dict(zip(names, per_source))
    return overall


def _mean(loss_sum: float, tokens: float, batches: int) -> MeanLoss:
    return MeanLoss(loss_sum / tokens if tokens else float("nan"), int(round(tokens)), batches)


def perplexity(loss: float) -> float:
    """exp(loss): inf where that is past the largest float (a loss of inf, or above ~709.8), nan for nan."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def validation_metrics(step: int, result: MeanLoss) -> dict:
    """The evaluation's record: val_loss, val_ppl and, with more than one source, val_loss/<source>
    (with one, val_loss is that source's)."""
    record = {"step": step, "val_loss": result.loss, "val_ppl": perplexity(result.loss)}
    if len(result.by_source) > 1:
        record.update({f"val_loss/{name}": r.loss for name, r in result.by_source.items()})
    return record
