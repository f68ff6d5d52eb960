"""What both incremental decoders (recurrent.RetNetDecoder, kv_cache.KVCacheDecoder) share: the
prefill/step interface that generate.py, bench/decode.py and decoding.CudaGraphStep drive, and the
embedding and LM head around the blocks. Each subclass runs its blocks on its own state."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional

import torch


class IncrementalDecoder(ABC):
    """Prefill a left-padded prompt batch, then one token per row per step. Subclasses keep their
    state in static device buffers (buffers/snapshot/restore) and implement _prefill_hidden and
    _step_hidden."""

    def __init__(self, model, batch_size: int):
        self.model, self.cfg, self.batch_size = model, model.config, batch_size
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype

    @torch.no_grad()
    def prefill(
        self,
        input_ids: torch.Tensor,
        doc_starts: Optional[torch.Tensor] = None,
        chunk_size: Optional[int] = None,
        piece: int = 0,
    ) -> torch.Tensor:
        """Prompt [B, T] (left-padded; doc_starts marks each row's first real token, and any document
        start inside a prompt, which hides what came before it) -> the last token's logits [B, V].
        chunk_size and piece: see the subclass's _prefill_hidden."""
        batch, T = input_ids.shape
        if T < 1:
            raise ValueError("prefill: empty prompt")
        if batch != self.batch_size:
            raise ValueError(f"prefill: batch of {batch} prompts, decoder was built for {self.batch_size}")
        x = self._prefill_hidden(input_ids, doc_starts, chunk_size, piece)
        return self._logits(x[:, -1:])

    def step(self, tokens: torch.Tensor, starts: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One token per row [B] -> logits [B, V]; updates the state in place. starts [B] bool: the rows whose
        token starts a document (the one before ended one), which sees nothing before it, as in training.
        Capturable."""
        x = self.model.embed_tokens(tokens.view(-1, 1))  # not model.embed: its range check syncs with the host
        if self.cfg.embed_scale:
            x = x * self.cfg.d_model**0.5
        return self._logits(self._step_hidden(x, starts))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1, D] -> [B, V]: only the last position goes through the LM head (a [B, T, vocab]
        logits tensor is 16 GiB at 8k x 32)."""
        return self.model.lm_head(self.model.norm(x))[:, 0]

    @abstractmethod
    def _prefill_hidden(self, input_ids, doc_starts, chunk_size, piece) -> torch.Tensor:
        """The prompt through the blocks into the state -> hidden states [B, t, D] ending at its last token."""

    @abstractmethod
    def _step_hidden(self, x: torch.Tensor, starts: Optional[torch.Tensor]) -> torch.Tensor:
        """Embedded tokens [B, 1, D] through the blocks, updating the state -> [B, 1, D]; the rows where
        starts [B] (None: none) forget the state first."""
