"""Building blocks shared by RetNet and the Transformer baseline."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import DecoderConfig
from .loss import linear_cross_entropy

ACTIVATION_FNS = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (as torchscale does), optional elementwise scale."""

    def __init__(self, dim: int, eps: float, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x):
        y = x.float()
        y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        return y if self.weight is None else y * self.weight


def make_norm(kind: str, dim: int, eps: float, affine: bool = True) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, eps, affine)
    return nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)


class FeedForward(nn.Module):
    """mlp: fc2(act(fc1 x)) (paper); glu: fc2(act(fc1 x) * gate x) (torchscale's GLU)."""

    def __init__(self, d_model: int, ffn_dim: int, ffn_type: str, activation: str):
        super().__init__()
        self.act = ACTIVATION_FNS[activation]
        self.fc1 = nn.Linear(d_model, ffn_dim, bias=False)
        self.gate = nn.Linear(d_model, ffn_dim, bias=False) if ffn_type == "glu" else None
        self.fc2 = nn.Linear(ffn_dim, d_model, bias=False)

    def forward(self, x):
        h = self.act(self.fc1(x))
        if self.gate is not None:
            h = h * self.gate(x)
        return self.fc2(h)


class StackedLinear(nn.Linear):
    """Several projections of one input in one weight, `row_blocks` rows each (each block is
    initialized as its own matrix, see init_weights). One GEMM and one output per block, the graph
    separate Linears give (one GEMM shared by q and k keeps more for the backward under
    torch.compile), all inside this module's forward, where ZeRO-3 has gathered the weight."""

    def __init__(self, in_features: int, row_blocks: tuple):
        super().__init__(in_features, sum(row_blocks), bias=False)
        self.row_blocks = row_blocks

    def blocks(self) -> tuple:
        """The weight's row blocks, as views."""
        return self.weight.split(list(self.row_blocks))

    def forward(self, x):
        return tuple(F.linear(x, w) for w in self.blocks())


def rotate_every_two(x):
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rotary(x, sin, cos):
    """Rotate pairs (2i, 2i+1) of the last dim by position-dependent angles (xPos/RoPE style)."""
    return x * cos + rotate_every_two(x) * sin


def rotary_sin_cos(inv_freq: torch.Tensor, start: int, length: int, dtype) -> tuple:
    """sin/cos [length, dim] for positions start..start+length-1, computed in float64 so that
    large absolute positions keep relative angles exact to fp32 rounding."""
    pos = torch.arange(start, start + length, device=inv_freq.device, dtype=torch.float64)
    angles = pos[:, None] * inv_freq.double().repeat_interleave(2)[None, :]
    return angles.sin().to(dtype), angles.cos().to(dtype)


def rotary_at(inv_freq: torch.Tensor, position: torch.Tensor, length: int, dtype) -> tuple:
    """sin/cos [length, dim] for positions position..position+length-1, the start held in a 0-d device
    tensor (no host sync, so a decode step that calls it is capturable in a CUDA graph); float64 as
    rotary_sin_cos."""
    pos = position.double() + torch.arange(length, device=position.device, dtype=torch.float64)
    angles = pos[:, None] * inv_freq.double().repeat_interleave(2)[None, :]
    return angles.sin().to(dtype), angles.cos().to(dtype)


class CausalLMOutput(dict):
    """logits, loss and (RetNet, return_state) the recurrent state, read and set as attributes.

    A dict, as transformers' ModelOutput is: DeepSpeed's engine looks for tensors in a model output that
    is a tensor, tuple, list or dict (nothing else) to hook its backward prologue on them. Without that
    hook its BF16_Optimizer (bf16 with fp32 gradient accumulation) never clears the bf16 gradients of the
    previous micro-batch and adds them into the fp32 ones again."""

    FIELDS = ("logits", "loss", "state")

    def __init__(self, logits: Optional[torch.Tensor] = None, loss: Optional[torch.Tensor] = None, state: Any = None):
        super().__init__(logits=logits, loss=loss, state=state)

    def __getattr__(self, name):
        if name in CausalLMOutput.FIELDS:
            return self[name]
        raise AttributeError(f"CausalLMOutput has no attribute {name!r}")

    def __setattr__(self, name, value):
        if name not in CausalLMOutput.FIELDS:
            raise AttributeError(f"CausalLMOutput has no field {name!r} (fields: {', '.join(self.FIELDS)})")
        self[name] = value


NORMAL_INIT_STD = 0.02  # Hugging Face Llama's initializer_range


def init_weights(model: nn.Module, config: DecoderConfig, gains: dict) -> None:
    """Initialize every Linear/Embedding/norm of `model`.

    torchscale: embeddings and LM head N(0, d^-1/2); projections named in `gains` use
    xavier_uniform with that gain (RetNet: q/k/v/g 2^-2.5, out 1; a StackedLinear block by
    block); other linears keep torch's default (kaiming uniform), as in the reference code.
    scaled_normal (GPT-NeoX small_init + wang_init): std sqrt(2 / 5d) everywhere, residual
    output projections (out_proj, fc2) std 2 / (L sqrt d).
    normal: N(0, 0.02) for every Linear and Embedding, as Hugging Face's Llama.
    """
    d, L = config.d_model, config.n_layers
    small = math.sqrt(2 / (5 * d))
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Embedding) or leaf == "lm_head":
            std = {"torchscale": d**-0.5, "normal": NORMAL_INIT_STD}.get(config.init, small)
            nn.init.normal_(module.weight, 0.0, std)
        elif isinstance(module, nn.Linear):
            if config.init == "normal":
                nn.init.normal_(module.weight, 0.0, NORMAL_INIT_STD)
            elif config.init == "scaled_normal":
                std = 2 / (L * math.sqrt(d)) if leaf in ("out_proj", "fc2") else small
                nn.init.normal_(module.weight, 0.0, std)
            elif leaf in gains:
                for rows in module.blocks() if isinstance(module, StackedLinear) else [module.weight]:
                    nn.init.xavier_uniform_(rows, gain=gains[leaf])
            else:
                module.reset_parameters()
        elif isinstance(module, (nn.LayerNorm, RMSNorm)):
            if module.weight is not None:
                nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


class LMHead(nn.Linear):
    """Logits, or with labels the chunked loss (model/loss.py). Inside the module's own forward
    so that ZeRO-3 gathers the weight for either use."""

    def __init__(self, d_model: int, vocab_size: int):
        super().__init__(d_model, vocab_size, bias=False)

    def forward(self, x, labels=None):
        return super().forward(x) if labels is None else linear_cross_entropy(x, self.weight, labels)


class DecoderLM(nn.Module):
    """Token embedding -> blocks -> final norm -> LM head, shared by both architectures."""

    def __init__(self, config: DecoderConfig, blocks: list):
        super().__init__()
        config.validate()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(blocks)
        self.norm = make_norm(config.norm, config.d_model, config.norm_eps)
        self.lm_head = LMHead(config.d_model, config.vocab_size)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # one Parameter, listed once
        self.check_inputs = True  # off for CUDA-graph decoding, where a host sync is not allowed
        for name, value in self.constants().items():
            self.register_buffer(name, value, persistent=False)

    def constants(self) -> dict:
        """{buffer name: exact value} for the architecture's constants (rotary frequencies, decay
        rates), computed from the config; each subclass lists its own."""
        return {}

    def _apply(self, fn, recurse=True):
        # .to(bfloat16) / .half() cast every float buffer, but these are constants, not weights:
        # inv_freq in bf16 moves a rotary angle at distance 8192 by up to 14.8 rad, so a model trained
        # with exact ones (DeepSpeed casts parameters only) would be evaluated with others. They
        # keep their exact dtype and follow the device.
        super()._apply(fn, recurse)
        for name, exact in self.constants().items():
            current = getattr(self, name)
            if current.dtype != exact.dtype:
                setattr(self, name, exact.to(current.device))
        return self

    def num_params(self, exclude_embeddings: bool = False) -> int:
        # a tied weight counts once; under ZeRO-3 a parameter holds its shard (numel 0 on most ranks) and
        # DeepSpeed records its full size as ds_numel
        n = sum(_full_numel(p) for p in self.parameters())
        return n - _full_numel(self.embed_tokens.weight) if exclude_embeddings else n

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if input_ids.numel() == 0:
            raise ValueError(
                f"input_ids is empty (shape {tuple(input_ids.shape)}): every form needs at least one token per row"
            )
        if self.check_inputs:
            lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()  # one host sync, not two
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"input_ids out of range: min {lo}, max {hi}, vocab_size {self.config.vocab_size}")
        x = self.embed_tokens(input_ids)
        return x * math.sqrt(self.config.d_model) if self.config.embed_scale else x

    def head(self, x: torch.Tensor, labels: Optional[torch.Tensor], return_logits: bool = True) -> CausalLMOutput:
        """Final norm, LM head and loss. With labels and return_logits=False the loss is computed
        chunk by chunk (model/loss.py) and the [B, T, vocab] logits never exist whole."""
        x = self.norm(x)
        if labels is not None and labels.shape != x.shape[:2]:
            raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(x.shape[:2])}")
        if labels is not None and not return_logits:
            return CausalLMOutput(logits=None, loss=self.lm_head(x, labels))
        logits = self.lm_head(x)
        loss = None
        if labels is not None:
            # labels are aligned with input_ids (the loader shifts them); -100 is ignored.
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return CausalLMOutput(logits=logits, loss=loss)


def _full_numel(p: torch.Tensor) -> int:
    return getattr(p, "ds_numel", p.numel())
