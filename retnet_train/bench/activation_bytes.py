r"""Bytes a block keeps for its backward, per token, measured with saved-tensor hooks on the real
forward (eager, or compiled as the trainer compiles: parallel.parallelize with the activation memory
budget), for RetNet and the Transformer baseline side by side.

    python -m retnet_train.bench.activation_bytes --preset 1.3b --seq-len 8192 --micro-batch 2 \
        --compile --activation-memory-budget 0.8 --models "retnet@chunk_size=256,transformer"

Prints one JSON line per model: bytes per token of one layer, and its largest kept tensors. The
model is built with two layers and the second is reported: the sin/cos tables and other inputs that
every layer shares are first kept by the first layer, so the second one's bytes are a layer's own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from contextlib import contextmanager

import torch

from ..model import build_model
from ..model.config import RETENTION_BACKENDS
from ..parallel import parallelize
from .throughput_args import count, model_specs


@contextmanager
def kept_by_block(model):
    """Yields {block index: {storage: (bytes, shape, dtype)}} of the tensors autograd keeps for backward
    while each block's forward runs (each storage counted once, for the block that kept it first;
    parameters left out)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept, seen, running = {}, set(), []

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if running and ptr not in params and ptr not in seen:
            seen.add(ptr)
            kept.setdefault(running[-1], {})[ptr] = (t.untyped_storage().nbytes(), tuple(t.shape), str(t.dtype))
        return t

    def leave(module, args, out):
        running.pop()  # (returns None: the output stays)

    hooks = []
    for i, block in enumerate(model.layers):
        hooks.append(block.register_forward_pre_hook(lambda m, a, i=i: running.append(i)))
        hooks.append(block.register_forward_hook(leave))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield kept
    finally:
        for h in hooks:
            h.remove()


def layer_bytes_per_token(
    cfg,
    micro_batch: int,
    seq_len: int,
    device,
    dtype=torch.bfloat16,
    compile: bool = False,
    activation_memory_budget: float = 1.0,
    doc_len: int = 0,
    activation_checkpointing: str = "none",
) -> dict:
    """One training forward of a 2-layer `cfg` model: the second layer's kept bytes per token and its
    kept tensors, largest first. Compiled: a first forward and backward compile it."""
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(cfg, n_layers=2)).to(device=device, dtype=dtype).train()
    parallelize(
        model,
        compile=compile,
        activation_memory_budget=activation_memory_budget,
        activation_checkpointing=activation_checkpointing,
    )
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len), device=device, generator=g)
    kwargs = {"labels": torch.roll(ids, -1, 1), "return_logits": False}
    if doc_len:
        kwargs["doc_starts"] = torch.rand(micro_batch, seq_len, device=device, generator=g) < 1.0 / doc_len
    try:
        if compile:
            model(ids, **kwargs).loss.backward()
        with kept_by_block(model) as kept:
            loss = model(ids, **kwargs).loss
        loss.backward()
    finally:
        torch._dynamo.reset()
        torch._functorch.config.activation_memory_budget = 1.0  # process-wide: back to torch's default
    layer = sorted(kept.get(1, {}).values(), reverse=True)
    tokens = micro_batch * seq_len
    return {
        "bytes_per_token": sum(b for b, _, _ in layer) / tokens,
        "tensors": [[round(b / tokens, 1), list(shape), dtype] for b, shape, dtype in layer],
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m retnet_train.bench.activation_bytes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--preset",
        default="1.3b",
        help="configs/model/<preset>.yaml; the Transformer uses transformer_<preset> (default: %(default)s)",
    )
    p.add_argument(
        "--models",
        default="retnet,transformer",
        help="comma list of retnet, transformer; each may add preset overrides: retnet@chunk_size=256 "
        "(default: %(default)s)",
    )
    p.add_argument("--seq-len", type=count(1), default=8192, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--micro-batch", type=count(1), default=1, help="sequences per forward (default: %(default)s)")
    p.add_argument("--compile", action="store_true", help="torch.compile each block as the trainer does")
    p.add_argument(
        "--activation-memory-budget",
        type=float,
        default=1.0,
        help="with --compile: torch's budget (default: %(default)s)",
    )
    p.add_argument(
        "--backend", default="auto", choices=RETENTION_BACKENDS, help="RetNet retention backend (default: %(default)s)"
    )
    p.add_argument(
        "--activation-checkpointing",
        default="none",
        choices=("none", "selective"),
        help="with --compile: selective recomputes RetNet's projections + retention core (in the compiled block)"
        " (default: %(default)s)",
    )
    p.add_argument(
        "--doc-len",
        type=count(0),
        default=0,
        help="mean document length for doc_starts, 0: none (default: %(default)s)",
    )
    p.add_argument("--cpu", action="store_true", help="run on CPU (bf16 as on GPU)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if not 0 < args.activation_memory_budget <= 1:
        p.error(f"--activation-memory-budget {args.activation_memory_budget} is not in (0, 1]")
    if args.activation_memory_budget != 1.0 and not args.compile:
        p.error("--activation-memory-budget needs --compile")
    if args.cpu and args.backend in ("fla", "triton"):
        p.error(f"--backend {args.backend} needs a GPU: on --cpu, auto or torch")
    if args.activation_checkpointing != "none" and not args.compile:
        p.error("--activation-checkpointing needs --compile: eager recomputation keeps its inputs outside the hooks")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("activation_bytes: no GPU (--cpu: measure on CPU)")
    device = torch.device("cpu" if args.cpu else "cuda")
    specs = model_specs(args.models, args.preset, args.backend)
    if any(name == "fla" for name, *_ in specs):  # before any model is measured
        raise SystemExit("--models: fla's model is not measured here (retnet, transformer)")
    for name, overrides, cfg, _ in specs:
        r = layer_bytes_per_token(
            cfg,
            args.micro_batch,
            args.seq_len,
            device,
            compile=args.compile,
            activation_memory_budget=args.activation_memory_budget,
            doc_len=args.doc_len,
            activation_checkpointing=args.activation_checkpointing,
        )
        print(json.dumps(report_row(name, overrides, args, r)), flush=True)


def report_row(name: str, overrides: dict, args, measured: dict) -> dict:
    """One model's printed line: the run's settings, then its layer's kept bytes per token (16 largest tensors)."""
    return {
        "model": name,
        "overrides": overrides,
        "preset": args.preset,
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "compile": args.compile,
        "activation_memory_budget": args.activation_memory_budget,
        "activation_checkpointing": args.activation_checkpointing,
        "bytes_per_token_per_layer": round(measured["bytes_per_token"], 1),
        "bytes_per_token_by_tensor": measured["tensors"][:16],
    }


if __name__ == "__main__":
    main()
