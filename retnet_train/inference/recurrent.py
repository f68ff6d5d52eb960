"""RetNet's incremental decoder: chunkwise prefill, then one token per step with O(1) memory.

The prefill is the model's own forward (`RetNetForCausalLM.hidden_states`, chunkwise, returning the
state). `RetNetDecoder` then keeps the recurrent state in static, preallocated buffers
[B, H, K, V+1] (fp32, as fla keeps it) which each block's own `step` updates in place, with the
position as a device tensor, so one step is capturable in a CUDA graph (decoding.CudaGraphStep).
tests/inference checks the logits against the parallel form.

Batches of prompts of different lengths are left-padded; the first real token of each row is a
document start, so the state is cleared before it and the pads leave no trace (rotation is
relative, decay normalization uses the position inside the document).
"""

from __future__ import annotations

from typing import List, Optional

import torch

from ..model import RetNetForCausalLM
from ..model.layers import rotary_at
from ..model.retnet import decay_normalizer
from .incremental import IncrementalDecoder


class RetNetDecoder(IncrementalDecoder):
    """Prefill + in-place recurrent step for a RetNetForCausalLM (see module docstring). state_dtype:
    fp32 (or fp64); a bf16 state only bounds the speed (bench.decode): it cannot hold the slower heads'
    per-token decay (1 - 2^-9 and closer to 1 round to 1)."""

    def __init__(self, model: RetNetForCausalLM, batch_size: int, state_dtype: torch.dtype = torch.float32):
        if not isinstance(model, RetNetForCausalLM):
            raise TypeError(f"RetNetDecoder needs a RetNetForCausalLM, got {type(model).__name__}")
        super().__init__(model, batch_size)
        cfg = model.config
        width = cfg.value_head_dim + (1 if cfg.normalize_retention else 0)  # +1: score row sums
        shape = (batch_size, cfg.n_heads, cfg.key_head_dim, width)
        self.states = [torch.zeros(shape, device=self.device, dtype=state_dtype) for _ in range(cfg.n_layers)]
        self.position = torch.zeros((), dtype=torch.long, device=self.device)  # tokens consumed (incl. pads)
        self.doc_position = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        # decays in fp32 at least, as the training forms compute them (fp64 for an fp64 model)
        decay_dtype = torch.promote_types(self.dtype, torch.float32)
        self.gamma = model.log_gamma.to(decay_dtype).exp().view(1, -1, 1, 1).to(self.device)

    def buffers(self) -> List[torch.Tensor]:
        return [*self.states, self.position, self.doc_position]

    def snapshot(self) -> List[torch.Tensor]:
        return [t.clone() for t in self.buffers()]

    def restore(self, snap: List[torch.Tensor]) -> None:
        for t, s in zip(self.buffers(), snap):
            t.copy_(s)

    def state_bytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.states)

    def _prefill_hidden(self, input_ids, doc_starts, chunk_size, piece) -> torch.Tensor:
        """Runs the prompt (chunkwise form) into the static state. piece > 0 feeds the prompt in pieces
        of that many tokens (bounds activation memory)."""
        model = self.model
        T = input_ids.shape[1]
        state = None
        step = T if piece <= 0 else piece
        for lo in range(0, T, step):
            resets = None if doc_starts is None else doc_starts[:, lo : lo + step].bool()
            if resets is not None and not bool(resets.any()):
                resets = None  # no document start in this piece: lets fla take it with a state
            # keep_state: decoding continues from the state, summed exactly in fp32 (a bf16 model's too)
            x, state = model.hidden_states(
                input_ids[:, lo : lo + step], resets, "chunkwise", chunk_size, state, keep_state=True
            )
        for buf, s in zip(self.states, state.layers):
            buf.copy_(s.to(buf.dtype))
        self.position.fill_(state.position)
        self.doc_position.copy_(state.doc_position)
        return x

    def _step_hidden(self, x: torch.Tensor, starts: Optional[torch.Tensor]) -> torch.Tensor:
        model, cfg = self.model, self.cfg
        sin, cos = (t.unsqueeze(1) for t in rotary_at(model.inv_freq, self.position, 1, x.dtype))  # [1, 1, K]
        decay = self.gamma
        if starts is not None:
            # a decay of 0 clears a starting row's state in the step's own decay pass (no pass of its own)
            decay = self.gamma * (~starts).to(self.gamma.dtype).view(-1, 1, 1, 1)
            self.doc_position.masked_fill_(starts, 0)
        c = decay_normalizer(model.log_gamma, self.doc_position[:, None]) if cfg.normalize_retention else None
        for block, state in zip(model.layers, self.states):
            x = block.step(x, sin, cos, state, decay, c)
        self.position.add_(1)
        self.doc_position.add_(1)
        return x
