"""RetNet decoder: multi-scale retention (MSR) blocks on the shared decoder skeleton."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..kernels import resolve_backend, retention_op
from .config import RetNetConfig
from .layers import (
    ACTIVATION_FNS,
    CausalLMOutput,
    DecoderLM,
    FeedForward,
    StackedLinear,
    apply_rotary,
    init_weights,
    make_norm,
    rotary_sin_cos,
)


@dataclass
class RetNetState:
    """Recurrent state after `position` tokens: per layer [B, H, K, V(+1)] plus, per sequence,
    the tokens seen since its current document started (for the decay normalization). A layer's
    entry is what its retention core takes as incoming state: None is zero (a start position
    without a state), a context-parallel core takes the earlier ranks' (parallel/context.py)."""

    layers: List[Any]
    position: int
    doc_position: torch.Tensor  # [B] int64


@dataclass
class SequenceContext:
    """What every block of one forward shares, built once by the model's forward."""

    sin: torch.Tensor  # [T, 1, K] rotary sin/cos of the tokens' positions
    cos: torch.Tensor
    log_gamma: torch.Tensor  # [H] each head's log decay
    doc_pos: torch.Tensor  # [B, T] position of each token inside its document
    reset: Optional[torch.Tensor]  # [B, T] bool document starts, None: no resets
    mode: str  # parallel | chunkwise | recurrent
    chunk_size: int
    keep_state: bool  # the caller uses the final state: the torch forms sum it exactly (retention_op)


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
        self.recompute = config.retention_recompute
        # q, k and v stacked in one weight (rows [q; k; v]): DeepSpeed's optimizer step costs per
        # parameter tensor, so 2 fewer tensors per layer is a shorter step (docs/benchmarks.md). The
        # gate keeps its own weight, computed after the retention (forward says why).
        self.qkv_proj = StackedLinear(d, row_blocks=(d, d, vd))
        self.g_proj = nn.Linear(d, vd, bias=False)
        self.out_proj = nn.Linear(vd, d, bias=False)
        self.group_norm = make_norm(config.norm, self.head_dim, config.norm_eps, affine=False)
        self.group_norm_weight = nn.Parameter(torch.ones(vd)) if config.head_norm_affine else None
        self.gate_fn = ACTIVATION_FNS[config.gate_activation]

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
        k = apply_rotary((k * K**-0.5).view(B, T, H, K), sin, cos)
        return q, k, v.view(B, T, H, self.head_dim)

    def forward(self, x, ctx: SequenceContext, state=None):
        (o, scale), state = self.mix(x, ctx, state)
        # g is computed here, after the retention: computed before it, torch.compile kept silu's
        # fp32 upcast of g for backward instead of bf16 g (+1.5 GiB at 1.3B, 8k)
        return self.out_proj(self.gated_norm(self.g_proj(x), o, scale)), state

    def mix(self, x, ctx: SequenceContext, state=None):
        """The token mixing of the normed block input x: its q, k and v projections and the retention
        core -> ((o, its normalization factor), the state). Attribute lookups both: parallel/parallelize.py
        replaces the core (context parallel) or this whole region (selective recomputation) per instance."""
        q, k, v = self.projections(x, ctx.sin, ctx.cos)
        return self.retention_core(q, k, v, ctx, state)

    def gated_norm(self, g, o, scale):
        """gate(g) * head_norm(o * scale) for the gate projection g [B, T, H*V], the retention output o
        [B, T, H, V] and its normalization factor (None: off). The backward recomputes this elementwise
        region from g, o and the factor instead of keeping its four 2d-wide intermediates (normalized
        o, normed o, gate(g), the product): eagerly through checkpointing, compiled as the
        partitioner's recomputed region."""
        if self.training and torch.is_grad_enabled():
            return checkpoint(self._gated_norm, g, o, scale, use_reentrant=False)
        return self._gated_norm(g, o, scale)

    def _gated_norm(self, g, o, scale):
        # in o's [..., H, V] shape throughout, flattened last: torch.compile then fuses the backward's
        # gate and norm gradients into one pass (a [..., H * V] gate splits it into two)
        normed = self.per_head_norm(o if scale is None else o * scale.to(o.dtype))
        return (self.gate_fn(g.view_as(normed)) * normed).flatten(-2)

    def gated_output(self, x, o):
        """out_proj(gate(g_proj x) * o) for the normed block input x and the normed retention output o
        (step: decoding, which has no backward)."""
        return self.out_proj(self.gate_fn(self.g_proj(x)) * o)

    def retention_core(self, q, k, v, ctx: SequenceContext, state=None):
        """Retention: ((o [B, T, H, V] unnormalized, its normalization factor [B, T, H, 1] or None), the
        state); gated_norm applies the factor and the per-head norm."""
        o, row_sum, state = self.retain(q, k, v, ctx, state)
        return self.finish(o, row_sum, ctx), state

    def retain(self, q, k, v, ctx: SequenceContext, state=None, state_grad: bool = False):
        """The retention kernel: unnormalized o [B, T, H, V], its score row sums [B, T, H] (None
        without the normalization) and the final state; state_grad: the final state is differentiated.
        A state returned with grad enabled may be (a later forward continues it): Triton's carries no
        gradient, so that forward asks for one too."""
        backend = resolve_backend(self.backend, q.device, q.shape[-1])
        state_grad = state_grad or (ctx.keep_state and torch.is_grad_enabled())
        return retention_op(
            backend,
            q,
            k,
            v,
            ctx.log_gamma,
            ctx.mode,
            ctx.chunk_size,
            ctx.reset,
            state,
            self.normalize,
            state_grad=state_grad,
            recompute=self.recompute,
            keep_state=ctx.keep_state,
        )

    def finish(self, o, row_sum, ctx: SequenceContext):
        """retain's output -> (o, the paper's normalization factor or None when off), what gated_norm takes."""
        return o, self.normalization(row_sum, decay_normalizer(ctx.log_gamma, ctx.doc_pos)) if self.normalize else None

    def normalization(self, row_sum, c):
        """The paper's normalization factor [..., H, 1] (fp32, no gradient) of a retention output with
        score row sums [..., H] (detached, as in torchscale) and c from decay_normalizer: scores /
        max(|sum of scaled scores|, 1)."""
        return (c / (c * row_sum.float()).abs().clamp(min=1)).unsqueeze(-1)

    def normalized(self, o, row_sum, c):
        """The retention output o [..., H, V] normalized (see normalization)."""
        return o * self.normalization(row_sum, c).to(o.dtype)

    def head_norm(self, o):
        """The per-head norm (GroupNorm with a group per head) of o [..., H, V] -> [..., H * V]."""
        return self.per_head_norm(o).flatten(-2)

    def per_head_norm(self, o):
        """head_norm without the flattening: [..., H, V]."""
        o = self.group_norm(o)
        return o if self.group_norm_weight is None else o * self.group_norm_weight.view(o.shape[-2:])

    def step(self, x, sin, cos, state, decay, normalizer=None):
        """The recurrent form for a few tokens x [B, T, d] (one per decode step) continuing `state`
        [B, H, K, V(+1)], which is updated in place, so that a step captured in a CUDA graph replays it.
        decay: gamma [1, H, 1, 1] in the state's dtype, or [B, H, 1, 1] (0: the row's state is cleared, a
        document starts); normalizer: decay_normalizer at each token's document position [B, T, H] (needed
        with the normalization). The state's extra column, fed a
        column of ones, carries the score row sums."""
        q, k, v = self.projections(x, sin, cos)
        if self.normalize:
            v = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)
        q, k, v = q.to(state.dtype), k.to(state.dtype), v.to(state.dtype)
        outs = []
        for t in range(x.shape[1]):
            # in place, no [B, H, K, V] temporary: the state is the largest thing read per step
            state.mul_(decay).addcmul_(k[:, t, ..., None], v[:, t, ..., None, :])
            outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state))
        o = outs[0].unsqueeze(1) if len(outs) == 1 else torch.stack(outs, dim=1)
        if self.normalize:
            o = self.normalized(o[..., :-1], o[..., -1], normalizer)
        return self.gated_output(x, self.head_norm(o.to(x.dtype)))


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

    def forward(self, x, ctx: SequenceContext, state=None):
        h, state = self.retention(self.retention_norm(x), ctx, state)
        x = x + h
        return x + self.ffn(self.ffn_norm(x)), state

    def step(self, x, sin, cos, state, decay, normalizer=None):
        """The block on a few new tokens with its recurrent state updated in place (MultiScaleRetention.step)."""
        x = x + self.retention.step(self.retention_norm(x), sin, cos, state, decay, normalizer)
        return x + self.ffn(self.ffn_norm(x))


class RetNetForCausalLM(DecoderLM):
    """RetNet language model with parallel, chunkwise and recurrent forms over one set of weights."""

    def __init__(self, config: RetNetConfig):
        super().__init__(config, [RetNetBlock(config) for _ in range(config.n_layers)])
        init_weights(self, config, gains={"qkv_proj": 2**-2.5, "g_proj": 2**-2.5, "out_proj": 1.0})

    def constants(self) -> dict:
        cfg = self.config
        # torchscale's angles: 1 / 10000^linspace(0, 1, K/2), one per rotation pair.
        inv_freq = 1.0 / cfg.rotary_base ** torch.linspace(0, 1, cfg.key_head_dim // 2, dtype=torch.float64)
        return {"inv_freq": inv_freq, "log_gamma": decay_log_gammas(cfg.n_heads)}

    def document_starts(self, input_ids, doc_starts) -> Optional[torch.Tensor]:
        """doc_starts as the blocks see them: bool, or None where the config has document masking off."""
        if doc_starts is None:
            return None
        if doc_starts.shape != input_ids.shape:
            raise ValueError(f"doc_starts shape {tuple(doc_starts.shape)} != input_ids shape {tuple(input_ids.shape)}")
        return doc_starts.bool() if self.config.document_masking else None

    def forward(
        self,
        input_ids,
        labels=None,
        doc_starts=None,
        mode: Optional[str] = None,
        chunk_size: Optional[int] = None,
        state: Optional[RetNetState] = None,
        return_state: bool = False,
        return_logits: bool = True,
    ) -> CausalLMOutput:
        x, new_state = self.hidden_states(
            input_ids, self.document_starts(input_ids, doc_starts), mode, chunk_size, state, keep_state=return_state
        )
        out = self.head(x, labels, return_logits)
        if return_state:
            out.state = new_state
        return out

    def hidden_states(
        self,
        input_ids,
        resets: Optional[torch.Tensor] = None,
        mode: Optional[str] = None,
        chunk_size: Optional[int] = None,
        state: Optional[RetNetState] = None,
        keep_state: bool = True,
    ):
        """The blocks' output [B, T, d] (before the final norm) and the state after these tokens: forward
        without the head. resets [B, T] bool are honoured as given (forward passes its doc_starts through
        the config's document_masking; decoding needs them for left padding whatever the config).
        keep_state=False: the state is not used (forward without return_state), so the torch forms may
        return a bf16 model's state as the bf16 scan's last row (cast to fp32) rather than summed in fp32."""
        cfg = self.config
        mode = cfg.mode if mode is None else mode
        chunk_size = cfg.chunk_size if chunk_size is None else chunk_size
        if mode not in ("parallel", "chunkwise", "recurrent"):
            raise ValueError(f"mode: {mode!r} is not one of ['parallel', 'chunkwise', 'recurrent']")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size: must be an integer >= 1, got {chunk_size!r}")
        x = self.embed(input_ids)
        B, T = input_ids.shape
        if state is not None and (len(state.layers) != cfg.n_layers or state.doc_position.shape[0] != B):
            raise ValueError(
                f"state has {len(state.layers)} layers of batch {state.doc_position.shape[0]}; "
                f"model needs {cfg.n_layers} of batch {B}"
            )
        start = 0 if state is None else state.position
        doc_start_pos = torch.zeros(B, dtype=torch.long, device=x.device) if state is None else state.doc_position
        doc_pos = document_positions(resets, T, doc_start_pos)
        sin, cos = (t.unsqueeze(1) for t in rotary_sin_cos(self.inv_freq, start, T, x.dtype))  # [T, 1, K]
        ctx = SequenceContext(sin, cos, self.log_gamma, doc_pos, resets, mode, chunk_size, keep_state)
        new_layers = []
        for i, block in enumerate(self.layers):
            x, layer_state = block(x, ctx, None if state is None else state.layers[i])
            new_layers.append(layer_state)
        return x, RetNetState(new_layers, start + T, doc_pos[:, -1] + 1 if T else doc_start_pos)
