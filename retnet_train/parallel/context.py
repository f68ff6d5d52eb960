"""Context parallelism: one sequence split over the P ranks of a group, the retention state
passed from rank to rank.

Rank r holds tokens [r T, (r+1) T) of every row (T = seq_len / P). Retention is linear in its
incoming state, so each rank runs its usual kernel (torch or fla) with zero incoming state and
corrects the result afterwards instead of running a second retention pass:

    o_t += gamma^(t+1) q_t S_in     for local tokens t before the segment's first document start
    S_in(r) = sum_{j<r} (prod_{j<i<r} a_i) S_j,   a_i = gamma^T * [no document start in segment i]

S_j is rank j's final local state: the [B, H, K, V(+1)] tensor the kernels return, including the
row-sum column when the paper's normalization is on, so the row sums get the same correction
from that column. The S_j are exchanged with one all-gather per layer (a few MB) whose backward
all-reduces the gathered gradient: rank j's S_j receives d(sum of all ranks' losses)/dS_j.

Every rank runs the same ops (rank 0 too, with all-zero weights): the gather synchronizes the
ranks at every layer anyway, so skipping rank 0's correction would save no time, and identical
graphs keep the order of collectives (ours, DeepSpeed's gradient hooks) the same on every rank.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..components.config import CP_KEY
from ..model.retnet import RetNetState

KEY = CP_KEY


class _GatherStates(torch.autograd.Function):
    """all_gather -> [P, ...] whose backward sums the gathered gradient over the group and keeps this
    rank's slice. (torch.distributed.nn's all_gather backward uses reduce_scatter, which gloo lacks.)"""

    @staticmethod
    def forward(ctx, x, group, rank, size):
        ctx.group, ctx.rank = group, rank
        out = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(out, x.contiguous(), group=group)
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()  # all_reduce works in place; the incoming grad may be shared
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None, None, None


@dataclass
class ContextParallel:
    """This rank's place in its context-parallel group (group None: the default group)."""

    group: Any
    rank: int
    size: int

    def shard(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's contiguous 1/P of `t` along the sequence dim."""
        if t.shape[dim] % self.size:
            raise ValueError(f"{KEY}={self.size} does not divide the sequence length {t.shape[dim]}")
        return t.chunk(self.size, dim=dim)[self.rank].contiguous()

    def shard_batch(self, batch: dict) -> dict:
        return {k: self.shard(v) if v.dim() >= 2 else v for k, v in batch.items()}

    @torch.no_grad()
    def segment(
        self, doc_starts: Optional[torch.Tensor], labels: Optional[torch.Tensor], B: int, T: int, device
    ) -> "Segment":
        """Per-forward facts from the other ranks: one small all-gather of each rank's last document
        start per row (global index, -1: none) and its count of valid labels."""
        idx = torch.arange(T, device=device)
        offset = self.rank * T
        if doc_starts is None:
            last = torch.full((B,), -1, dtype=torch.long, device=device)
            first = torch.full((B,), T, dtype=torch.long, device=device)
        else:
            last = torch.where(doc_starts, idx + offset, -1).amax(dim=1)
            first = torch.where(doc_starts, idx, T).amin(dim=1)
        count = (labels != -100).sum().view(1) if labels is not None else last.new_zeros(1)
        info = torch.cat([last, count.to(last.dtype)])
        gathered = [torch.empty_like(info) for _ in range(self.size)]
        dist.all_gather(gathered, info, group=self.group)
        gathered = torch.stack(gathered)  # [P, B + 1]
        lasts = gathered[:, :B]
        before = lasts[: self.rank].amax(dim=0) if self.rank else torch.full_like(last, -1)
        # tokens since the current document started, at this segment's first token (global positions
        # continue from 0 where no document has started yet: what one rank computes for the full row)
        doc_start_pos = torch.where(before >= 0, offset - before, torch.full_like(before, offset))
        return Segment(self, T, lasts >= 0, first, doc_start_pos, gathered[:, B].sum())


@dataclass
class Segment:
    """One forward's view of the split sequence; what the retention layers and the loss need."""

    cp: ContextParallel
    length: int  # T: tokens per rank
    has_start: torch.Tensor  # [P, B] bool: segment i contains a document start
    first_start: torch.Tensor  # [B] local index of this segment's first document start (T: none)
    doc_start_pos: torch.Tensor  # [B] position inside its document of this segment's first token
    group_tokens: torch.Tensor  # valid labels in the whole group's sequences

    @property
    def position(self) -> int:
        return self.cp.rank * self.length

    def incoming_weights(self, log_gamma: torch.Tensor) -> torch.Tensor:
        """w[j, b, h] = prod_{j<i<r} a_i: how much of rank j's final state reaches this segment."""
        P, r, T = self.cp.size, self.cp.rank, self.length
        j = torch.arange(P, device=log_gamma.device)
        hops = (r - 1 - j).clamp(min=0).to(torch.float64)
        w = torch.exp(log_gamma.double().view(1, -1) * T * hops.view(P, 1))  # [P, H], <= 1: no overflow
        starts = torch.cumsum(self.has_start.int(), dim=0)  # [P, B]
        # no document start in segments j+1 .. r-1 (r = 0: nothing comes in)
        alive = (
            (starts[r - 1 : r] - starts == 0) & (j < r).view(P, 1) if r else torch.zeros_like(starts, dtype=torch.bool)
        )
        return (w.view(P, 1, -1) * alive.unsqueeze(-1)).float()  # [P, B, H]

    def combine(self, o, row_sum, state, q, log_gamma):
        """Add the other ranks' contribution to this rank's local retention output.

        o [B, T, H, V] unnormalized, row_sum [B, T, H] or None, state [B, H, K, V(+1)] (local, zero
        incoming state), q [B, T, H, K] rotated; returns o and row_sum as if the whole sequence ran here.
        """
        cp = self.cp
        V = o.shape[-1]
        states = _GatherStates.apply(state.float(), cp.group, cp.rank, cp.size)  # [P, B, H, K, V(+1)]
        s_in = torch.einsum("pbh,pbhkv->bhkv", self.incoming_weights(log_gamma).to(states.device), states)
        T = o.shape[1]
        t = torch.arange(T, device=o.device)
        decay = torch.exp(log_gamma.float().view(1, -1) * (t + 1).float().view(-1, 1))  # gamma^(t+1), [T, H]
        # the incoming state reaches a token only before the segment's first document start
        reach = (t.view(1, T) < self.first_start.view(-1, 1)).unsqueeze(-1) * decay  # [B, T, H]
        # (q S_in) * reach rather than (q * reach) S_in: autograd then keeps q, which the retention
        # kernel keeps anyway, and the small reach, instead of a second q-sized tensor per layer
        q = q.to(o.dtype)
        o = o + torch.einsum("bthk,bhkv->bthv", q, s_in[..., :V].to(o.dtype)) * reach.unsqueeze(-1).to(o.dtype)
        if row_sum is not None:
            with torch.no_grad():  # the normalization detaches the row sums
                row_sum = row_sum + torch.einsum("bthk,bhk->bth", q.float(), s_in[..., V]) * reach
        return o, row_sum

    def scale_loss(self, loss: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """L_r = P * (sum of this rank's token losses) / (valid tokens of the whole group).

        DeepSpeed averages gradients over all W = DP * P ranks, and each rank's gradient already
        holds, through the state exchange, its part of d(sum_r L_r)/dtheta; sum_r L_r = P * L_group,
        so the average is d(mean over DP groups of L_group)/dtheta, exactly the 1-rank gradient.
        The trainer's reported loss (sum of L_r over the world / W) is then the group mean too."""
        n = (labels != -100).sum()
        scaled = loss * (n.clamp(min=1) * self.cp.size / self.group_tokens.clamp(min=1)).to(loss.dtype)
        return torch.where(n > 0, scaled, torch.zeros_like(scaled))  # no valid label here: 0, not NaN


def context_parallel_core(retention):
    """A retention core for `retention` (model/retnet.py's MultiScaleRetention) whose incoming state
    is the forward's Segment: it runs the local kernel from a zero state, then adds what the earlier
    ranks' final states contribute. The Segment travels as the layer's state argument, so that a
    recomputation in the backward pass (activation checkpointing) sees the same one."""

    def core(q, k, v, ctx, segment: Segment):
        # the local final state reaches the later ranks' outputs: summed exactly, as a prefill's is
        o, row_sum, state = retention.retain(q, k, v, replace(ctx, keep_state=True), None, state_grad=True)
        o, row_sum = segment.combine(o, row_sum, state, q, ctx.log_gamma)
        return retention.finish(o, row_sum, ctx), state

    return core


def context_parallel_forward(model, cp: ContextParallel):
    """`model`'s forward on this rank's 1/P of every row: the tokens continue the earlier ranks'
    positions (fed as a recurrent state's position would be, with the Segment as every layer's
    incoming state) and the loss is this rank's share of the group's (Segment.scale_loss)."""
    forward, signature, n_layers = model.forward, inspect.signature(model.forward), model.config.n_layers

    def run(*args, **kwargs):
        call = signature.bind(*args, **kwargs)
        call.apply_defaults()
        a = call.arguments
        if a["state"] is not None or a["return_state"]:
            raise ValueError("context parallel (training) takes no state and returns none")
        ids, labels = a["input_ids"], a["labels"]
        B, T = ids.shape
        segment = cp.segment(model.document_starts(ids, a["doc_starts"]), labels, B, T, ids.device)
        a["state"] = RetNetState([segment] * n_layers, segment.position, segment.doc_start_pos)
        out = forward(*call.args, **call.kwargs)
        if out.loss is not None:
            out.loss = segment.scale_loss(out.loss, labels)
        return out

    return run
