"""How a model is trained, applied to it from outside (torchtitan's parallelize): context parallelism,
torch.compile of each block and activation checkpointing. The model's modules stay as they are
built: each change replaces a forward, a retention core or its mix on one instance, so parameter names,
state dicts and DeepSpeed's hooks are those of the plain model."""

from __future__ import annotations

from typing import Optional

import torch
import torch._functorch.config
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..components.config import checkpointing_mode
from ..model.retnet import MultiScaleRetention, RetNetForCausalLM
from .context import KEY, ContextParallel, context_parallel_core, context_parallel_forward

# what parallelize sets per instance: finding one of them means the model was parallelized already
REPLACED_METHODS = {"forward", "mix", "retention_core"}


def parallelize(
    model: nn.Module,
    *,
    compile: bool = False,
    activation_checkpointing="none",
    activation_memory_budget: float = 1.0,
    context_parallel: Optional[ContextParallel] = None,
    compile_mode: Optional[str] = None,
):
    """Apply to `model` (built by model.build_model, before or after deepspeed.initialize) in place, and
    return it.

    context_parallel: each rank gets its 1/P slice of every row, returns its slice of the logits and
    its share of the loss (parallel/context.py). compile: torch.compile each block. activation_checkpointing:
    what the backward pass recomputes instead of keeping, "full" each block, "selective" only RetNet's
    token mixing (the q, k, v projections and the retention core: the block then keeps none of q, k,
    v for one more forward of their GEMMs), "none" nothing. activation_memory_budget < 1 (needs
    compile): the compiled backward recomputes what the forward would keep, cheapest first, until
    what is kept is that fraction."""
    mode = checkpointing_mode(activation_checkpointing)
    check_compile_options(compile, activation_memory_budget, compile_mode)
    if any(vars(m).keys() & REPLACED_METHODS for m in model.modules()):
        raise ValueError("parallelize: this model is parallelized already; build a new one")
    if context_parallel is not None:
        apply_context_parallel(model, context_parallel)
    if compile:
        apply_compile(model, activation_memory_budget, compile_mode)
    apply_activation_checkpointing(model, mode)
    refuse_deepcopy(model)
    return model


def refuse_deepcopy(model: nn.Module) -> None:
    """A replaced forward, mix or retention core calls the module it was made for: a deepcopy would keep
    calling the original's (weights included). copy.deepcopy finds __deepcopy__ on the instance."""
    for module in model.modules():
        replaced = sorted(vars(module).keys() & REPLACED_METHODS)
        if replaced:
            module.__deepcopy__ = deepcopy_refused(type(module).__name__, replaced)


def deepcopy_refused(name: str, replaced: list):
    def refuse(memo):
        raise TypeError(
            f"copy.deepcopy: parallelize() replaced this {name}'s {' and '.join(replaced)} with calls into the "
            "original module, so a copy would run the original's weights; copy the model before parallelize() "
            "and parallelize the copy"
        )

    return refuse


def apply_context_parallel(model: nn.Module, cp: ContextParallel) -> None:
    if not isinstance(model, RetNetForCausalLM):
        raise ValueError(
            f"{KEY}={cp.size} needs a RetNet (model.arch=retnet): only its state can be passed between ranks"
        )
    for module in model.modules():
        if isinstance(module, MultiScaleRetention):
            module.retention_core = context_parallel_core(module)
    model.forward = context_parallel_forward(model, cp)


COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_compile_options(compile: bool, activation_memory_budget: float, mode: Optional[str]) -> None:
    """Refuses a budget outside (0, 1], a budget below 1 without compile and an unknown compile mode
    (before parallelize changes the model, so that a corrected call can follow)."""
    if not 0 < activation_memory_budget <= 1:
        raise ValueError(f"activation_memory_budget: {activation_memory_budget} is not in (0, 1]")
    if activation_memory_budget != 1 and not compile:
        raise ValueError(
            f"activation_memory_budget: {activation_memory_budget} needs compile: torch.compile's "
            "partitioner does the recomputing"
        )
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode: {mode!r} is not one of {list(COMPILE_MODES[1:])}")


def apply_compile(model: nn.Module, activation_memory_budget: float = 1.0, mode: Optional[str] = None) -> None:
    """torch.compile each block in place: fuses norms, rotation, gate and FFN elementwise work; fla's
    kernels are excluded from compilation by fla itself. The budget is torch's own knob (torchtitan's
    memory_budget mode): process-wide, read when a block first runs. mode: torch.compile's
    (reduce-overhead: each block's forward and backward replayed as CUDA graphs, no host launches).
    The options are checked by check_compile_options."""
    torch._functorch.config.activation_memory_budget = activation_memory_budget
    for block in model.layers:
        # the forward only, not the module call: hooks on the block (ZeRO-3's parameter gathering)
        # stay outside the graph instead of breaking it
        block.forward = torch.compile(block.forward, mode=mode)
    if mode == "reduce-overhead":
        copy_graph_gradients(model.layers)


def copy_graph_gradients(blocks: nn.Module) -> None:
    """Under CUDA graphs a parameter's first gradient of a step is a graph output that autograd would keep
    as .grad, and the next micro-batch's replay overwrites it (pytorch/pytorch#169545): each gradient
    is copied out of the graph's memory before it is accumulated."""
    for param in blocks.parameters():
        if param.requires_grad:
            param.register_hook(torch.clone)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """After apply_compile: "full" wraps each block's (compiled) forward, "selective" each retention's
    mix (projections + core), which runs inside the compiled block (after apply_context_parallel:
    the recomputation repeats the state exchange)."""
    mode = checkpointing_mode(mode)
    if mode == "full":
        for block in model.layers:
            block.forward = recomputed(block.forward, block)
    elif mode == "selective":
        for module in model.modules():
            if isinstance(module, MultiScaleRetention):
                module.mix = recomputed(module.mix, module)


def recomputed(fn, module: nn.Module):
    """fn, whose activations the backward pass recomputes instead of keeping while `module` trains."""

    def run(*args):
        if module.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    return run
