"""train_throughput's command line: the argument groups and their value types, and --models read into
the models to measure."""

from __future__ import annotations

import argparse
import json

import yaml

from ..components.config import CHECKPOINTING_MODES
from ..model import build_model
from ..model.config import RETENTION_BACKENDS
from ..parallel.parallelize import COMPILE_MODES
from .presets import fla_reference, load_preset


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object: {text!r}")
    return value


def int_list(text: str) -> list:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma list of integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"needs integers >= 1: {text!r}")
    return values


def budget_list(text: str) -> list:
    """An argparse type: a comma list of activation memory budgets, each in (0, 1]."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma list of numbers: {text!r}") from None
    if not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"needs budgets in (0, 1]: {text!r}")
    return values


def mode_list(text: str) -> list:
    """An argparse type: a comma list of activation checkpointing modes."""
    values = text.split(",")
    bad = [v for v in values if v not in CHECKPOINTING_MODES]
    if bad:
        raise argparse.ArgumentTypeError(f"{bad[0]!r} is not one of {', '.join(CHECKPOINTING_MODES)}: {text!r}")
    return values


def count(minimum: int):
    """An argparse type: an integer >= minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"needs an integer >= {minimum}: {text!r}")
        return value

    return parse


def model_specs(models: str, preset: str, backend: str) -> list:
    """(name, overrides, config, build) for each entry of --models."""
    specs = []
    for spec in models.split(","):
        # a model, optionally with preset overrides: retnet@normalize_retention=false@chunk_size=128
        name, *sets = spec.split("@")
        bad = next((item for item in sets if "=" not in item), None)
        if bad is not None:
            raise SystemExit(f"--models: {bad!r} in {spec!r} is not KEY=VALUE (a preset override)")
        overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in sets)}
        if name not in ("retnet", "transformer", "fla"):
            raise SystemExit(f"--models: unknown model {name!r} (retnet, transformer, fla)")
        try:  # an override the model config refuses (an unknown key, a bad value): named, not a traceback
            if name == "transformer":
                cfg = load_preset(f"transformer_{preset}", **overrides)
            else:
                cfg = load_preset(preset, **{"retention_backend": backend, **overrides})
        except (ValueError, TypeError) as exc:
            raise SystemExit(f"--models: {spec!r}: {exc}") from None
        if name == "fla":
            build = lambda cfg=cfg: fla_reference(cfg)  # noqa: E731
        else:
            build = lambda cfg=cfg: build_model(cfg)  # noqa: E731
        specs.append((name, overrides, cfg, build))
    return specs


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    """What is measured: the models, the sequence lengths, the batch and the steps."""
    p.add_argument(
        "--preset", default="1.3b", help="configs/model/<preset>.yaml; the Transformer uses transformer_<preset>"
    )
    p.add_argument(
        "--models",
        default="retnet,transformer,fla",
        help="comma list of retnet, transformer, fla; each may add preset overrides: retnet@chunk_size=128",
    )
    p.add_argument(
        "--seq-len",
        type=int_list,
        default=[8192],
        help="a comma list of sequence lengths, each measured for every model: 2048,8192,32768,65536",
    )
    p.add_argument(
        "--micro-batch",
        type=count(1),
        default=1,
        help="sequences per micro-batch at the first --seq-len; a "
        "later length keeps the tokens per micro-batch: max(1, micro_batch x first_len // len) sequences",
    )
    p.add_argument(
        "--grad-accum",
        type=int_list,
        default="1",
        help="micro-batches per optimizer step at the first --seq-len (a later "
        "length keeps the tokens per step: max(1, steps' tokens // (its micro-batch x len))); a comma list "
        "measures each in one process (Triton autotuning is paid once)",
    )
    p.add_argument("--steps", type=count(1), default=10)
    p.add_argument("--warmup", type=count(0), default=3)


def add_training_args(p: argparse.ArgumentParser) -> None:
    """How each model trains: ZeRO, activation checkpointing, compilation, documents, retention backend."""
    p.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3])
    p.add_argument(
        "--activation-checkpointing",
        type=mode_list,
        default="none",
        help="what the backward recomputes: none, selective (RetNet's q/k/v projections + retention core) "
        "or full; a comma list measures each in one process",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the non-kernel parts of each block")
    p.add_argument(
        "--compile-mode",
        default=None,
        choices=COMPILE_MODES[1:],
        help="with --compile: torch.compile's mode (reduce-overhead: each block as CUDA graphs)",
    )
    p.add_argument(
        "--activation-memory-budget",
        type=budget_list,
        default="1.0",
        help="< 1 (with --compile): the compiled backward recomputes elementwise work, then GEMMs; a comma "
        "list measures each in one process (the rows draw with bench.tradeoff)",
    )
    p.add_argument("--doc-len", type=count(0), default=0, help="mean document length for doc_starts (0: none)")
    p.add_argument("--backend", default="auto", choices=RETENTION_BACKENDS, help="RetNet retention backend")


def add_run_args(p: argparse.ArgumentParser) -> None:
    """Profiling, DeepSpeed overrides, the plot and the CPU check."""
    p.add_argument("--profile", action="store_true", help="add a GPU time breakdown by kernel category")
    p.add_argument(
        "--profile-top", type=int, default=15, metavar="N", help="with --profile: list the N longest kernels"
    )
    p.add_argument(
        "--profile-trace",
        default=None,
        metavar="DIR",
        help="with --profile: also record the host's ops and write the Chrome trace "
        "DIR/<model>_<seq_len>_mb<micro-batch>x<accum>.json (-2, -3, ... where it exists)",
    )
    p.add_argument(
        "--ds-json",
        type=json_object,
        default=None,
        metavar="JSON",
        help='merged into the DeepSpeed config, e.g. \'{"zero_optimization": {"overlap_comm": false}}\'',
    )
    p.add_argument(
        "--plot",
        default=None,
        metavar="PATH",
        help="write a PNG of tokens/s and peak memory against sequence length, one line per model",
    )
    p.add_argument(
        "--cpu",
        action="store_true",
        help="run on CPU (gloo, fp32; peak memory is the process's resident "
        "peak): a check of the script, not a measurement",
    )
