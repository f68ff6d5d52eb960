"""Model parallelism beyond DeepSpeed's data parallelism: context parallelism (context.py)."""
from .context import KEY, ContextParallel, Segment
from .setup import attach, build_context_parallel, check_layout, loss_weight

__all__ = ["KEY", "ContextParallel", "Segment", "attach", "build_context_parallel", "check_layout", "loss_weight"]
