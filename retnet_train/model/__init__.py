"""RetNet and its Transformer baseline. `build_model(model_config_from_dict(preset))`."""

from .config import RetNetConfig, TransformerConfig, model_config_from_dict
from .layers import CausalLMOutput
from .retnet import RetNetForCausalLM, RetNetState
from .transformer import TransformerForCausalLM


def build_model(config):
    """The model for a validated config (RetNetConfig or TransformerConfig)."""
    if isinstance(config, RetNetConfig):
        return RetNetForCausalLM(config)
    if isinstance(config, TransformerConfig):
        return TransformerForCausalLM(config)
    raise TypeError(f"build_model: expected RetNetConfig or TransformerConfig, got {type(config).__name__}")


__all__ = [
    "RetNetConfig",
    "TransformerConfig",
    "model_config_from_dict",
    "build_model",
    "CausalLMOutput",
    "RetNetForCausalLM",
    "RetNetState",
    "TransformerForCausalLM",
]
