"""How a model is trained, applied from outside (parallelize.py): compile, activation checkpointing,
and context parallelism (context.py) beyond DeepSpeed's data parallelism."""

from .context import KEY, ContextParallel, Segment
from .parallelize import parallelize
from .setup import build_context_parallel, check_layout, loss_weight

__all__ = ["KEY", "ContextParallel", "Segment", "parallelize", "build_context_parallel", "check_layout", "loss_weight"]
