"""Model configs: plain dataclasses, validated once, built from a preset dict."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

NORMS = ("layernorm", "rmsnorm")
FFN_TYPES = ("mlp", "glu")
ACTIVATIONS = ("gelu", "silu", "relu")
INITS = ("torchscale", "scaled_normal", "normal")
RETENTION_MODES = ("parallel", "chunkwise", "recurrent")
RETENTION_BACKENDS = ("auto", "torch", "fla", "triton")


def _check(ok: bool, cls: str, field: str, msg: str) -> None:
    if not ok:
        raise ValueError(f"{cls}.{field}: {msg}")


def _check_choice(cls: str, field: str, value: Any, choices: tuple) -> None:
    _check(value in choices, cls, field, f"{value!r} is not one of {list(choices)}")


@dataclass
class DecoderConfig:
    """Fields shared by RetNet and the Transformer baseline (a pre-norm decoder).

    Defaults follow the paper's 1.3B model: LayerNorm, a GELU MLP with ffn_dim = 2 d_model
    (so a block has 12 d^2 parameters like a Transformer block), untied embeddings, no
    sqrt(d) embedding scale (torchscale's default).
    """

    vocab_size: int = 32000
    d_model: int = 2048
    n_layers: int = 24
    n_heads: int = 8
    ffn_dim: int = 4096
    ffn_type: str = "mlp"  # mlp: act(x W1) W2 (paper) | glu: (act(x W1) * x Wg) W2 (torchscale)
    activation: str = "gelu"
    norm: str = "layernorm"
    norm_eps: float = 1e-6
    embed_scale: bool = False  # multiply token embeddings by sqrt(d_model)
    tie_embeddings: bool = False
    # torchscale: xavier init as in the reference code (what RetNet was released with);
    # scaled_normal: GPT-NeoX small_init/wang_init (std sqrt(2/5d), output projections 2/(L sqrt d)).
    # normal: N(0, 0.02) for every linear and embedding (Hugging Face Llama's initializer_range).
    init: str = "torchscale"
    rotary_base: float = 10000.0
    # Reset the sequence mixer at document starts inside packed sequences (doc_starts input).
    document_masking: bool = True

    def validate(self, section: str | None = None) -> None:
        """Raises ValueError naming `<section>.<field>` (default: the class, e.g. RetNetConfig.n_heads)."""
        cls = section or type(self).__name__
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_dim"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value > 0, cls, name, f"must be a positive integer, got {value!r}")
        _check(
            self.d_model % self.n_heads == 0, cls, "n_heads", f"{self.n_heads} does not divide d_model={self.d_model}"
        )
        _check(self.norm_eps > 0, cls, "norm_eps", f"must be > 0, got {self.norm_eps}")
        _check(self.rotary_base > 0, cls, "rotary_base", f"must be > 0, got {self.rotary_base}")
        _check_choice(cls, "ffn_type", self.ffn_type, FFN_TYPES)
        _check_choice(cls, "activation", self.activation, ACTIVATIONS)
        _check_choice(cls, "norm", self.norm, NORMS)
        _check_choice(cls, "init", self.init, INITS)

    def to_dict(self) -> dict:
        return {"arch": self.arch, **dataclasses.asdict(self)}


@dataclass
class RetNetConfig(DecoderConfig):
    """RetNet (Sun et al. 2023). Key head dim = d_model / n_heads (paper: 256), value dim =
    value_factor * d_model (paper: 2)."""

    value_factor: float = 2.0
    mode: str = "chunkwise"  # default form for forward(); each call may pick another
    chunk_size: int = 64
    # The paper's normalizations (decay-matrix rows and retention-score sums). Both are exact,
    # position-wise factors, computed identically in all three forms.
    normalize_retention: bool = True
    head_norm_affine: bool = False  # per-head GroupNorm scale (torchscale: none)
    gate_activation: str = "silu"  # swish
    retention_backend: str = "auto"  # auto: kernels.resolve_backend (our Triton kernels on NVIDIA)
    # torch backend: the backward recomputes the chunk states (less memory); false keeps them (faster)
    retention_recompute: bool = True

    @property
    def arch(self) -> str:
        return "retnet"

    @property
    def value_dim(self) -> int:
        return int(round(self.d_model * self.value_factor))

    @property
    def key_head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def value_head_dim(self) -> int:
        return self.value_dim // self.n_heads

    def validate(self, section: str | None = None) -> None:
        super().validate(section)
        cls = section or type(self).__name__
        _check(self.value_factor > 0, cls, "value_factor", f"must be > 0, got {self.value_factor}")
        exact = self.d_model * self.value_factor
        _check(
            math.isclose(exact, self.value_dim, rel_tol=1e-9),
            cls,
            "value_factor",
            f"d_model * value_factor = {self.d_model} * {self.value_factor} = {exact:g} is not a whole number of "
            f"value dims (for value dim {self.value_dim}: value_factor={self.value_dim / self.d_model!r})",
        )
        _check(
            self.value_dim >= self.n_heads,  # a value head of width 0 would make every retention output 0
            cls,
            "value_factor",
            f"value dim {self.value_dim} (= d_model * value_factor) is less than one per head (n_heads={self.n_heads})",
        )
        _check(
            self.value_dim % self.n_heads == 0,
            cls,
            "value_factor",
            f"value dim {self.value_dim} (= d_model * value_factor) is not divisible by n_heads={self.n_heads}",
        )
        _check(
            self.key_head_dim % 2 == 0,
            cls,
            "n_heads",
            f"key head dim {self.key_head_dim} must be even (rotation pairs)",
        )
        _check(
            isinstance(self.chunk_size, int) and self.chunk_size >= 1,
            cls,
            "chunk_size",
            f"must be an integer >= 1, got {self.chunk_size!r}",
        )
        _check_choice(cls, "mode", self.mode, RETENTION_MODES)
        _check_choice(cls, "gate_activation", self.gate_activation, ACTIVATIONS)
        _check_choice(cls, "retention_backend", self.retention_backend, RETENTION_BACKENDS)


@dataclass
class TransformerConfig(DecoderConfig):
    """Pre-norm Transformer with RoPE and SDPA attention: the paper's baseline."""

    n_heads: int = 16  # head dim 128
    document_masking: bool = False  # a block-diagonal mask disables the flash kernel

    @property
    def arch(self) -> str:
        return "transformer"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self, section: str | None = None) -> None:
        super().validate(section)
        _check(
            self.head_dim % 2 == 0,
            section or type(self).__name__,
            "n_heads",
            f"head dim {self.head_dim} must be even (RoPE pairs)",
        )


ARCHS = {"retnet": RetNetConfig, "transformer": TransformerConfig}

# Settings that choose how the same function is computed (the forms and backends are equal) or only draw
# fresh weights: a checkpoint resumes under other values of these, not of any other model setting.
EXECUTION_ONLY = frozenset({"mode", "chunk_size", "retention_backend", "retention_recompute", "init"})


def model_config_from_dict(d: Mapping[str, Any]) -> RetNetConfig | TransformerConfig:
    """Build and validate a config from a preset dict (e.g. configs/model/1.3b.yaml).

    `arch` picks the class; an unknown key or a wrong type raises ValueError naming it.
    """
    d = dict(d)
    arch = d.pop("arch", None)
    if arch not in ARCHS:
        raise ValueError(f"model.arch: {arch!r} is not one of {list(ARCHS)}")
    cls = ARCHS[arch]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"model.{unknown[0]}: unknown key for arch={arch} (valid: {sorted(fields)})")
    for key, value in d.items():
        expected = type(getattr(cls(), key))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            d[key] = float(value)
        elif not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ValueError(f"model.{key}: expected {expected.__name__}, got {type(value).__name__} ({value!r})")
    config = cls(**d)
    config.validate("model")  # the dict's keys are the model section's: errors name model.<key>
    return config


def function_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list:
    """'key: saved -> current' for each model setting, defaults filled in, whose change alters what the
    weights compute (EXECUTION_ONLY aside); the architecture alone when it differs."""
    old, new = model_config_from_dict(saved).to_dict(), model_config_from_dict(current).to_dict()
    if old["arch"] != new["arch"]:
        return [f"arch: {old['arch']} -> {new['arch']}"]
    return [f"{k}: {old[k]} -> {new[k]}" for k in sorted(old) if k not in EXECUTION_ONLY and old[k] != new.get(k)]
