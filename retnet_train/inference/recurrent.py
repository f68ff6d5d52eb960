"""RetNet's incremental decoder: chunkwise prefill, then one token per step with O(1) memory.

`RetNetDecoder` keeps the recurrent state in static, preallocated buffers [B, H, K, V+1] (fp32,
as fla keeps it) and updates them in place, with the position as a device tensor, so one step
is capturable in a CUDA graph (decoding.CudaGraphStep). The step re-uses the model's own modules and
computes exactly what `RetNetForCausalLM.forward(mode="recurrent")` computes for one token
(tests/inference checks logits against the parallel form).

Batches of prompts of different lengths are left-padded; the first real token of each row is a
document start, so the state is cleared before it and the pads leave no trace (rotation is
relative, decay normalization uses the position inside the document).
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ..model import RetNetForCausalLM
from ..model.layers import rotary_at, rotary_sin_cos
from ..model.retnet import SequenceContext, decay_normalizer, document_positions


class RetNetDecoder:
    """Prefill + in-place recurrent step for a RetNetForCausalLM (see module docstring)."""

    def __init__(self, model: RetNetForCausalLM, batch_size: int, state_dtype: torch.dtype = torch.float32):
        if not isinstance(model, RetNetForCausalLM):
            raise TypeError(f"RetNetDecoder needs a RetNetForCausalLM, got {type(model).__name__}")
        cfg = model.config
        self.model, self.cfg, self.batch_size = model, cfg, batch_size
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        width = cfg.value_head_dim + (1 if cfg.normalize_retention else 0)  # +1: score row sums
        self.states = [torch.zeros(batch_size, cfg.n_heads, cfg.key_head_dim, width, device=self.device, dtype=state_dtype)
                       for _ in range(cfg.n_layers)]
        self.position = torch.zeros((), dtype=torch.long, device=self.device)  # tokens consumed (incl. pads)
        self.doc_position = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        # decays in fp32 at least, as the training forms compute them (fp64 for an fp64 model)
        self.gamma = model.log_gamma.to(torch.promote_types(self.dtype, torch.float32)).exp().view(1, -1, 1, 1).to(self.device)

    def buffers(self) -> List[torch.Tensor]:
        return [*self.states, self.position, self.doc_position]

    def snapshot(self) -> List[torch.Tensor]:
        return [t.clone() for t in self.buffers()]

    def restore(self, snap: List[torch.Tensor]) -> None:
        for t, s in zip(self.buffers(), snap):
            t.copy_(s)

    def state_bytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.states)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, doc_starts: Optional[torch.Tensor] = None,
                chunk_size: Optional[int] = None, piece: int = 0) -> torch.Tensor:
        """Run the prompt (chunkwise form) into the static state; returns last-token logits [B, V].
        piece > 0 feeds the prompt in pieces of that many tokens (bounds activation memory).

        The model's forward loop, with two differences: resets are honoured even when the
        config has document_masking off (left padding needs them), and only the last position
        goes through the LM head (a [B, T, vocab] logits tensor is 16 GiB at 8k x 32)."""
        model, cfg = self.model, self.cfg
        B, T = input_ids.shape
        if B != self.batch_size:
            raise ValueError(f"prefill: batch of {B} prompts, decoder was built for {self.batch_size}")
        if T < 1:
            raise ValueError("prefill: empty prompt")
        chunk_size = cfg.chunk_size if chunk_size is None else chunk_size
        layers, position = [None] * cfg.n_layers, 0
        doc_pos0 = torch.zeros(B, dtype=torch.long, device=self.device)
        step = T if piece <= 0 else piece
        for lo in range(0, T, step):
            ids = input_ids[:, lo:lo + step]
            ds = None if doc_starts is None else doc_starts[:, lo:lo + step].bool()
            if ds is not None and not bool(ds.any()):
                ds = None  # no document start in this piece: lets fla take it with a state
            x = model.embed(ids)
            doc_pos = document_positions(ds, ids.shape[1], doc_pos0)
            sin, cos = (t.unsqueeze(1) for t in rotary_sin_cos(model.inv_freq, position, ids.shape[1], x.dtype))
            ctx = SequenceContext(sin, cos, model.log_gamma, doc_pos, ds, "chunkwise", chunk_size)
            for i, block in enumerate(model.layers):
                x, layers[i] = block(x, ctx, layers[i])
            position += ids.shape[1]
            doc_pos0 = doc_pos[:, -1] + 1
        for buf, s in zip(self.states, layers):
            buf.copy_(s.to(buf.dtype))
        self.position.fill_(position)
        self.doc_position.copy_(doc_pos0)
        return model.lm_head(model.norm(x[:, -1:]))[:, 0]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token per row [B] -> logits [B, V]; updates the state in place. Capturable."""
        model, cfg = self.model, self.cfg
        B = tokens.shape[0]
        H = cfg.n_heads
        x = model.embed_tokens(tokens.view(B, 1))
        if cfg.embed_scale:
            x = x * cfg.d_model ** 0.5
        sin, cos = rotary_at(model.inv_freq, self.position, x.dtype)
        sin, cos = sin.unsqueeze(1), cos.unsqueeze(1)  # [1, 1, K] against [B, 1, H, K]
        c = decay_normalizer(model.log_gamma, self.doc_position) if cfg.normalize_retention else None  # [B, H]
        for block, S in zip(model.layers, self.states):
            ret = block.retention
            h = block.retention_norm(x)
            q, k, v = ret.projections(h, sin, cos)
            q, k, v = q[:, 0], k[:, 0], v[:, 0]
            if cfg.normalize_retention:
                v = torch.cat([v, v.new_ones(B, H, 1)], dim=-1)
            # in place, no [B, H, K, V] temporary: the state is the largest thing read per step
            S.mul_(self.gamma).addcmul_(k.to(S.dtype)[..., :, None], v.to(S.dtype)[..., None, :])
            o = torch.einsum("bhk,bhkv->bhv", q.to(S.dtype), S)
            if cfg.normalize_retention:
                o = ret.normalized(o[..., :-1], o[..., -1], c)
            o = ret.head_norm(o.to(x.dtype)).view(B, 1, -1)
            x = x + ret.gated_output(h, o)
            x = x + block.ffn(block.ffn_norm(x))
        self.position.add_(1)
        self.doc_position.add_(1)
        return model.lm_head(model.norm(x))[:, 0]
