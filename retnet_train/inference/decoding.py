"""Incremental decoding for either architecture: left-padded prompt batches, the decoder of a model
(recurrent.RetNetDecoder: O(1) state; kv_cache.KVCacheDecoder: the Transformer's cache) and its step
captured in a CUDA graph.

Batches of prompts of different lengths are left-padded; the first real token of each row is a
document start, so the decoders clear the state (mask the cache) before it and pads leave no trace.
A prompt may also start a document after an EOS in it, as the training loader does (lm-eval
contexts of a model whose training documents followed an EOS: inference/framing.py).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..model import RetNetForCausalLM
from .errors import SettingError
from .kv_cache import KVCacheDecoder
from .recurrent import RetNetDecoder


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device, document_end_id: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, T] ids, doc_starts (True at each row's first real token, and at each prompt token after a
    document_end_id, as the training loader marks them) and prompt lengths."""
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    T = int(lengths.max())
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    starts = torch.zeros((len(prompts), T), dtype=torch.bool)
    for i, p in enumerate(prompts):
        if len(p):
            first = T - len(p)
            ids[i, first:] = torch.as_tensor(list(p), dtype=torch.long)
            starts[i, first] = True
            if document_end_id is not None:
                starts[i, first + 1 :] = ids[i, first:-1] == document_end_id
    return ids.to(device), starts.to(device), lengths.to(device)


class CudaGraphStep:
    """`decoder.step` captured once in a CUDA graph and replayed: no per-kernel launch cost.
    The decoder's state and position buffers are the graph's static inputs and are updated in
    place by every replay, so nothing is copied but the B token ids and document starts."""

    def __init__(self, decoder, warmup: int = 2, compile: bool = False):
        if decoder.device.type != "cuda":
            raise SettingError("cuda_graph", "needs the model on a CUDA device")
        self.decoder = decoder
        # compile: inductor fuses the step's many small elementwise kernels (norms, rotation,
        # decay factors) before capture; the graph then replays the fused kernels.
        step = torch.compile(decoder.step, dynamic=False) if compile else decoder.step
        self.tokens = torch.zeros(decoder.batch_size, dtype=torch.long, device=decoder.device)
        self.starts = torch.zeros(decoder.batch_size, dtype=torch.bool, device=decoder.device)
        snapshot = decoder.snapshot()  # warm-up and capture run the step: undo their effect
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(warmup + (2 if compile else 0)):
                step(self.tokens, self.starts)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.logits = step(self.tokens, self.starts)
        decoder.restore(snapshot)

    def __call__(self, tokens: torch.Tensor, starts: Optional[torch.Tensor] = None) -> torch.Tensor:
        """decoder.step(tokens, starts), replayed."""
        self.tokens.copy_(tokens)
        if starts is None:
            self.starts.fill_(False)
        else:
            self.starts.copy_(starts)
        self.graph.replay()
        return self.logits


def make_decoder(model, batch_size: int, max_length: int, state_dtype: torch.dtype = torch.float32):
    """The incremental decoder for either architecture (max_length: prompt + new tokens, the
    Transformer's KV cache size; RetNet's state does not depend on it)."""
    if isinstance(model, RetNetForCausalLM):
        return RetNetDecoder(model, batch_size, state_dtype)
    return KVCacheDecoder(model, batch_size, max_length)
