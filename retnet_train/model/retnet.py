"""RetNet decoder: multi-scale retention (MSR) blocks on the shared decoder skeleton."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import RetNetConfig
from .layers import ACTIVATION_FNS, DecoderLM, FeedForward, CausalLMOutput, StackedLinear, apply_rotary, init_weights, make_norm, rotary_sin_cos
from ..kernels import resolve_backend, retention_op


@dataclass
class RetNetState:
    """Recurrent state after `position` tokens: per layer [B, H, K, V(+1)] plus, per sequence,
    the tokens seen since its current document started (for the decay normalization)."""

    layers: List[torch.Tensor]
    position: int
    doc_position: torch.Tensor  # [B] int64


def decay_log_gammas(n_heads: int) -> torch.Tensor:
    """log(gamma_h), gamma_h = 1 - 2^(-5-h): one fixed decay per head (paper, torchscale)."""
    return torch.log(1 - 2.0 ** (-5 - torch.arange(n_heads, dtype=torch.float64))).float()


def document_positions(doc_starts: Optional[torch.Tensor], T: int, start: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its document, [B, T]; `start` [B] continues a state."""
    idx = torch.arange(T, device=start.device)
    pos = start[:, None] + idx[None, :]
    if doc_starts is None:
        return pos
    last_start = torch.where(doc_starts, idx[None, :], -1).cummax(dim=1).values
    return torch.where(last_start >= 0, idx[None, :] - last_start, pos)


class MultiScaleRetention(nn.Module):
    def __init__(self, config: RetNetConfig):
        super().__init__()
        d, vd = config.d_model, config.value_dim
        self.n_heads, self.key_dim, self.head_dim = config.n_heads, config.key_head_dim, config.value_head_dim
        self.normalize = config.normalize_retention
        self.backend = config.retention_backend
        # q, k and v stacked in one weight (rows [q; k; v]): DeepSpeed's optimizer step costs per
        # parameter tensor, so 2 fewer tensors per layer is a shorter step (docs/benchmarks.md). The
        # gate keeps its own weight, computed after the retention (gated_output says why).
        self.qkv_proj = StackedLinear(d, row_blocks=(d, d, vd))
        self.g_proj = nn.Linear(d, vd, bias=False)
        self.out_proj = nn.Linear(vd, d, bias=False)
        self.group_norm = make_norm(config.norm, self.head_dim, config.norm_eps, affine=False)
        self.group_norm_weight = nn.Parameter(torch.ones(vd)) if config.head_norm_affine else None
        self.gate_fn = ACTIVATION_FNS[config.gate_activation]
        self.checkpoint_core = False  # set by DecoderLM.set_activation_checkpointing("selective")

    def projection_weights(self) -> dict:
        """{"q": [d, d], "k": [d, d], "v": [vd, d]} (views of the stacked weight), "g": [vd, d]."""
        w = dict(zip("qkv", self.qkv_proj.blocks()))
        return {**w, "g": self.g_proj.weight}

    def projections(self, x, sin, cos):
        """Rotated q and k (k scaled by K^-1/2) [B, T, H, K] and v [B, T, H, V]."""
        B, T, _ = x.shape
        H, K = self.n_heads, self.key_dim
        q, k, v = self.qkv_proj(x)
        q = apply_rotary(q.view(B, T, H, K), sin, cos)
        k = apply_rotary((k * K ** -0.5).view(B, T, H, K), sin, cos)
        return q, k, v.view(B, T, H, self.head_dim)

    def forward(self, x, sin, cos, log_gamma, doc_pos, reset, mode, chunk_size, state=None, segment=None):
        q, k, v = self.projections(x, sin, cos)
        core = (q, k, v, log_gamma, doc_pos, reset, mode, chunk_size, state, segment)
        if self.checkpoint_core and self.training and torch.is_grad_enabled():
            o, state = checkpoint(self.retention_core, *core, use_reentrant=False)
        else:
            o, state = self.retention_core(*core)
        return self.gated_output(x, o), state

    def gated_output(self, x, o):
        """out_proj(gate(g_proj x) * o) for the normed block input x and the retention output o. g is
        computed here, after the retention: computed before it, torch.compile kept silu's fp32
        upcast of g for backward instead of bf16 g (+1.5 GiB at 1.3B, 8k)."""
        return self.out_proj(self.gate_fn(self.g_proj(x)) * o)

    def retention_core(self, q, k, v, log_gamma, doc_pos, reset, mode, chunk_size, state, segment=None):
        """Retention, the paper's normalization and the per-head norm: [B, T, H*V] and the state."""
        backend = resolve_backend(self.backend, q.device)
        o, row_sum, state = retention_op(backend, q, k, v, log_gamma, mode, chunk_size, reset, state, self.normalize,
                                         state_grad=segment is not None)
        if segment is not None:  # context parallel: add the earlier ranks' state (parallel/context.py)
            o, row_sum = segment.combine(o, row_sum, state, q, log_gamma)
        if self.normalize:
            o = self.normalized(o, row_sum, decay_normalizer(log_gamma, doc_pos))
        return self.head_norm(o), state

    def normalized(self, o, row_sum, c):
        """The paper's normalization of the retention output o [..., H, V] with its score row sums
        [..., H] (detached, as in torchscale) and c from decay_normalizer: scores / max(|sum of
        scaled scores|, 1)."""
        return o * (c / (c * row_sum.float()).abs().clamp(min=1)).unsqueeze(-1).to(o.dtype)

    def head_norm(self, o):
        """The per-head norm (GroupNorm with a group per head) of o [..., H, V] -> [..., H * V]."""
        o = self.group_norm(o).flatten(-2)
        return o if self.group_norm_weight is None else o * self.group_norm_weight


def decay_normalizer(log_gamma, doc_pos):
    """Paper 2.2: D~ = D / sqrt(sum_i D_ti), i.e. a factor c_t = (sum_{i<=p_t} gamma^i)^-1/2 per head
    at document position p_t: doc_pos [...] -> [..., H]."""
    return torch.sqrt(torch.expm1(log_gamma) / torch.expm1(log_gamma * (doc_pos[..., None].float() + 1)))


class RetNetBlock(nn.Module):
    def __init__(self, config: RetNetConfig):
        super().__init__()
        self.retention_norm = make_norm(config.norm, config.d_model, config.norm_eps)
        self.retention = MultiScaleRetention(config)
        self.ffn_norm = make_norm(config.norm, config.d_model, config.norm_eps)
        self.ffn = FeedForward(config.d_model, config.ffn_dim, config.ffn_type, config.activation)

    def forward(self, x, sin, cos, log_gamma, doc_pos, reset, mode, chunk_size, state=None, segment=None):
        h, state = self.retention(self.retention_norm(x), sin, cos, log_gamma, doc_pos, reset, mode, chunk_size, state, segment)
        x = x + h
        return x + self.ffn(self.ffn_norm(x)), state


class RetNetForCausalLM(DecoderLM):
    """RetNet language model with parallel, chunkwise and recurrent forms over one set of weights."""

    def __init__(self, config: RetNetConfig):
        super().__init__(config, [RetNetBlock(config) for _ in range(config.n_layers)])
        init_weights(self, config, gains={"qkv_proj": 2 ** -2.5, "g_proj": 2 ** -2.5, "out_proj": 1.0})
        self.context_parallel = None

    def constants(self) -> dict:
        cfg = self.config
        # torchscale's angles: 1 / 10000^linspace(0, 1, K/2), one per rotation pair.
        inv_freq = 1.0 / cfg.rotary_base ** torch.linspace(0, 1, cfg.key_head_dim // 2, dtype=torch.float64)
        return {"inv_freq": inv_freq, "log_gamma": decay_log_gammas(cfg.n_heads)}

    def set_context_parallel(self, cp) -> None:
        """cp: a parallel.ContextParallel (each rank then gets its 1/P slice of every row and returns
        its slice of the logits and its share of the loss), or None: off."""
        self.context_parallel = cp

    def forward(self, input_ids, labels=None, doc_starts=None, mode: Optional[str] = None,
                chunk_size: Optional[int] = None, state: Optional[RetNetState] = None,
                return_state: bool = False, return_logits: bool = True) -> CausalLMOutput:
        cfg = self.config
        mode = cfg.mode if mode is None else mode
        chunk_size = cfg.chunk_size if chunk_size is None else chunk_size
        if mode not in ("parallel", "chunkwise", "recurrent"):
            raise ValueError(f"mode: {mode!r} is not one of ['parallel', 'chunkwise', 'recurrent']")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size: must be an integer >= 1, got {chunk_size!r}")
        x = self.embed(input_ids)
        B, T = input_ids.shape
        if doc_starts is not None:
            if doc_starts.shape != input_ids.shape:
                raise ValueError(f"doc_starts shape {tuple(doc_starts.shape)} != input_ids shape {tuple(input_ids.shape)}")
            doc_starts = doc_starts.bool() if cfg.document_masking else None
        if state is not None and (len(state.layers) != cfg.n_layers or state.layers[0].shape[0] != B):
            raise ValueError(f"state has {len(state.layers)} layers of batch {state.layers[0].shape[0]}; model needs {cfg.n_layers} of batch {B}")
        start = 0 if state is None else state.position
        doc_start_pos = torch.zeros(B, dtype=torch.long, device=x.device) if state is None else state.doc_position
        segment = None
        if self.context_parallel is not None:  # this rank's tokens continue the earlier ranks' positions
            if state is not None or return_state:
                raise ValueError("context parallel (training) takes no state and returns none")
            segment = self.context_parallel.segment(doc_starts, labels, B, T, x.device)
            start, doc_start_pos = segment.position, segment.doc_start_pos
        doc_pos = document_positions(doc_starts, T, doc_start_pos)
        sin, cos = (t.unsqueeze(1) for t in rotary_sin_cos(self.inv_freq, start, T, x.dtype))  # [T, 1, K]
        new_layers = []
        for i, block in enumerate(self.layers):
            layer_state = None if state is None else state.layers[i]
            x, layer_state = self.run_block(block, x, sin, cos, self.log_gamma, doc_pos, doc_starts, mode, chunk_size, layer_state, segment)
            new_layers.append(layer_state)
        out = self.head(x, labels, return_logits)
        if segment is not None and out.loss is not None:
            out.loss = segment.scale_loss(out.loss, labels)
        if return_state:
            out.state = RetNetState(new_layers, start + T, doc_pos[:, -1] + 1)
        return out
