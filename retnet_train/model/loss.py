"""Cross-entropy of the LM head without materializing [tokens, vocab] fp32 logits.

The forward pass walks over token chunks, computes each chunk's logits, loss and the
gradients for the hidden states and head weight at once (softmax - one_hot), and keeps only
those gradients; backward just scales them. Peak extra memory: one chunk of fp32 logits (and
with fp16, whose gradients wait for backward's loss scale, the head's gradient kept in fp32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_BYTES = 256 * 2**20  # fp32 logits per chunk


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index=-100):
        n_tokens, vocab = hidden.shape[0], weight.shape[0]
        chunk = max(1, CHUNK_BYTES // (4 * vocab))
        valid = labels != ignore_index
        n_valid = valid.sum().clamp(min=1).float()
        # fp16: the logits' gradients divided by the token count underflow before backward brings the loss
        # scale (p / n_valid < 2^-24 is 0: a head row that is no target of the micro-batch would get no
        # gradient), so they are kept undivided (the head's summed in fp32: fp16 could overflow) and
        # divided in backward
        ctx.deferred = n_valid if hidden.dtype == torch.float16 else None
        row_scale = valid.float() if ctx.deferred is not None else valid / n_valid
        loss = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, n_tokens, chunk):
            h, y, ok = hidden[start : start + chunk], labels[start : start + chunk], valid[start : start + chunk]
            logits = (h @ weight.t()).float()
            safe_y = torch.where(ok, y, 0)
            lse = torch.logsumexp(logits, dim=-1)
            loss += ((lse - logits.gather(1, safe_y[:, None]).squeeze(1)) * ok).sum()
            grad = torch.softmax(logits, dim=-1)  # d loss / d logits = (softmax - one_hot) / n_valid
            grad.scatter_add_(1, safe_y[:, None], -torch.ones_like(grad[:, :1]))
            # scaled (0 on ignored rows) and cast to the hidden dtype in one pass
            scale = row_scale[start : start + chunk, None]
            grad = torch.mul(grad, scale, out=torch.empty_like(grad, dtype=hidden.dtype))
            grad_hidden[start : start + chunk] = grad @ weight
            grad_weight.add_(grad.t() @ h)  # bf16 product added in fp32, no fp32 copy of it
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight if ctx.deferred is not None else grad_weight.to(weight.dtype))
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_loss if ctx.deferred is None else grad_loss / ctx.deferred
        return grad_hidden * scale, (grad_weight * scale).to(ctx.weight_dtype), None, None


def linear_cross_entropy(hidden, weight, labels, ignore_index=-100):
    """Mean cross-entropy of softmax(hidden @ weight^T) over labels != ignore_index."""
    hidden, labels = hidden.flatten(0, -2), labels.flatten()
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(hidden, weight, labels, ignore_index)
    chunk = max(1, CHUNK_BYTES // (4 * weight.shape[0]))
    total = sum(
        F.cross_entropy(
            (hidden[i : i + chunk] @ weight.t()).float(),
            labels[i : i + chunk],
            ignore_index=ignore_index,
            reduction="sum",
        )
        for i in range(0, len(labels), chunk)
    )
    return total / (labels != ignore_index).sum().clamp(min=1)
