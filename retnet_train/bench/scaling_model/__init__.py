"""Per-GPU memory and communication of a training step under DeepSpeed ZeRO 0-3: an analytic model
(usage and scope: cli.py; `python -m retnet_train.bench.scaling_model`). One concern per module:
settings (ZeRO knobs, hardware, presets, units), memory (parameters, model states, activations),
comm (collectives per step), estimate (one configuration), checks (against saved tensors measured on
CPU and the GPU runs), cli (tables and the command line)."""

from .checks import measure_saved_activation_bytes, measured_bytes_per_token_per_layer, measured_run_predictions
from .cli import main, markdown_tables
from .comm import collective_bus_bytes, comm_ops, context_parallel_ops, context_parallel_state_bytes
from .estimate import estimate
from .memory import (
    activation_bytes_per_token_per_layer,
    activation_elements_per_token_per_layer,
    activation_fixed_bytes,
    bucket_bytes,
    bucket_bytes_in_forward,
    grads_held_bytes_per_param,
    meta_param_count,
    param_counts,
    qkv_proj_params,
    step_transient_bytes,
    zero_bytes_per_param,
)
from .settings import BF16, FP32, GLOBAL_BATCH_TOKENS, DeepSpeedSettings, GiB, Hardware, load_preset

__all__ = [
    "BF16",
    "FP32",
    "GLOBAL_BATCH_TOKENS",
    "DeepSpeedSettings",
    "GiB",
    "Hardware",
    "activation_bytes_per_token_per_layer",
    "activation_elements_per_token_per_layer",
    "activation_fixed_bytes",
    "bucket_bytes",
    "bucket_bytes_in_forward",
    "collective_bus_bytes",
    "comm_ops",
    "context_parallel_ops",
    "context_parallel_state_bytes",
    "estimate",
    "grads_held_bytes_per_param",
    "load_preset",
    "main",
    "markdown_tables",
    "measure_saved_activation_bytes",
    "measured_bytes_per_token_per_layer",
    "measured_run_predictions",
    "meta_param_count",
    "param_counts",
    "qkv_proj_params",
    "step_transient_bytes",
    "zero_bytes_per_param",
]
