"""The command line: parse and validate the options, compose the trainer's config from the run's
Hydra overrides (checkpoint dir, parameter count, precision, device), then run the node, storage
and shared-directory checks in order and exit 0 (passed), 1 (a check failed) or 2 (bad arguments).
Only the orchestration lives here; each check is in its own module."""

from __future__ import annotations

import argparse
import os
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .dist_check import dist_check
from .launcher_env import apply_launcher_env
from .node import check_fla, check_gpus, check_vendor, check_versions
from .report import Report, summarize
from .shared_dir import check_shared
from .storage import check_disk, check_writable, leaving_no_new_dirs
from .trainer_config import (
    PreflightError,
    TrainerView,
    compose_trainer_config,
    hydra_overrides,
    parse_params,
    resolve_params,
    trainer_view,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m retnet_train.preflight", description="Check a node before training (see the module docstring)."
    )
    p.add_argument("--checkpoint-dir", type=Path, help="checkpoint directory: writable, shared, free space")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--params", help="parameter count for the free-space check, e.g. 1.3e9")
    g.add_argument("--model-preset", help="model preset YAML (configs/model/NAME.yaml) to count parameters of")
    p.add_argument(
        "--keep-checkpoints",
        type=int,
        default=None,
        help="checkpoints on disk at once (default: the config's checkpoint.keep_last + 1, else 2)",
    )
    p.add_argument(
        "--no-config",
        action="store_true",
        help="do not compose the trainer's Hydra config from the overrides (another --module)",
    )
    p.add_argument("--nproc-per-node", type=int, help="processes this node will start (one per GPU)")
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument(
        "--world-size",
        type=int,
        help="processes of all nodes (default: --nnodes x --nproc-per-node); for nodes with different GPU counts",
    )
    p.add_argument("--shared-id", default="preflight", help="same on all nodes of one launch (e.g. the job id)")
    p.add_argument(
        "--shared-timeout",
        type=float,
        default=None,
        help="seconds to wait for the other nodes [PREFLIGHT_SHARED_TIMEOUT]; default 120",
    )
    p.add_argument("--require-gpu", action="store_true", help="fail when no GPU is visible")
    p.add_argument(
        "--vendor",
        choices=("cuda", "rocm"),
        help="the cluster's GPU stack: fail when torch is another build (a CUDA wheel on AMD nodes)",
    )
    p.add_argument("--require-fla", action="store_true", help="fail when fla's retention kernels cannot be imported")
    p.add_argument("--no-bf16-check", action="store_true", help="only warn when the GPU lacks bf16")
    p.add_argument(
        "--dist-check",
        action="store_true",
        help="run under torchrun: all_reduce across all ranks (gloo on CPU, nccl/rccl on GPU)",
    )
    p.add_argument(
        "--from-launcher-env",
        action="store_true",
        help="started by torchrun or the deepspeed launcher on every node: take node rank, node "
        "count and processes per node from its variables; only local rank 0 checks",
    )
    p.add_argument("overrides", nargs="*", help="after --: the Hydra overrides of the run (model=NAME is read)")
    return p


def _validate(args: argparse.Namespace) -> None:
    if args.nnodes < 1:
        raise PreflightError(f"--nnodes={args.nnodes} must be >= 1")
    if not 0 <= args.node_rank < args.nnodes:
        raise PreflightError(f"--node-rank={args.node_rank} must be in [0, {args.nnodes - 1}]")
    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        raise PreflightError(f"--nproc-per-node={args.nproc_per_node} must be >= 1")
    if args.world_size is not None:
        if args.world_size < 1:
            raise PreflightError(f"--world-size={args.world_size} must be >= 1")
        if args.world_size < max(args.nnodes, args.nproc_per_node or 1):
            least = f"--nproc-per-node={args.nproc_per_node}" if args.nproc_per_node else f"--nnodes={args.nnodes}"
            raise PreflightError(f"--world-size={args.world_size} is less than {least}")
    if args.keep_checkpoints is not None and args.keep_checkpoints < 1:
        raise PreflightError(f"--keep-checkpoints={args.keep_checkpoints} must be >= 1")
    if args.shared_timeout is None:
        raw = os.environ.get("PREFLIGHT_SHARED_TIMEOUT", "120")
        try:
            args.shared_timeout = float(raw)
        except ValueError:
            raise PreflightError(f"PREFLIGHT_SHARED_TIMEOUT={raw!r} is not a number of seconds") from None
    if not args.shared_timeout > 0:
        raise PreflightError(f"--shared-timeout={args.shared_timeout} must be > 0")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.shared_id):
        raise PreflightError(f"--shared-id={args.shared_id!r} may only contain letters, digits, '_', '.', '-'")


@dataclass
class Plan:
    """What the checks run on: the trainer's view of the run (None without a config) and what the
    options and that view say about the parameter count and the checkpoint directory."""

    view: TrainerView | None
    overrides: list[str]
    params: int | None
    source: str  # where the parameter count comes from
    ckpt_arg: Path | None  # --checkpoint-dir, absolute
    ckpt: Path | None  # the directory to check: --checkpoint-dir, else the trainer's


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.dist_check:
        return dist_check()
    try:
        if args.from_launcher_env and not apply_launcher_env(args, dict(os.environ)):
            return 0
        plan = _plan(args)
    except PreflightError as exc:
        print(f"preflight: error: {exc}", file=sys.stderr)
        return 2
    rep = Report()
    print(f"preflight: node {args.node_rank} of {args.nnodes} on {socket.gethostname()}", flush=True)
    _check_node(rep, args, plan.view)
    _check_trainer_config(rep, args, plan)
    _check_checkpoint_dir(rep, args, plan)
    return summarize(rep, args.node_rank)


def _plan(args: argparse.Namespace) -> Plan:
    """Validate the options and compose the trainer's config; raises PreflightError on bad input."""
    _validate(args)
    overrides = hydra_overrides(args.overrides)
    if args.params is not None:
        parse_params(args.params)  # a bad --params is reported before the config is composed
    view = None if args.no_config else _trainer_view(args, overrides)
    if args.params is not None or args.model_preset is not None or view is None:
        args.overrides = overrides
        params, source = resolve_params(args)
    else:
        params, source = view.params, "trainer config"
    ckpt_arg = args.checkpoint_dir.expanduser().absolute() if args.checkpoint_dir else None
    ckpt = ckpt_arg or (view.checkpoint_dir.expanduser().absolute() if view else None)
    if args.nnodes > 1 and ckpt is None:
        raise PreflightError(
            f"--nnodes={args.nnodes} needs --checkpoint-dir (or the trainer config): a "
            f"multi-node run must check that its checkpoint directory is shared"
        )
    return Plan(view, overrides, params, source, ckpt_arg, ckpt)


def _trainer_view(args: argparse.Namespace, overrides: list[str]) -> TrainerView | None:
    """The trainer's view for these overrides; None when this checkout has no trainer config or its
    layout is not the one this preflight reads."""
    cfg = compose_trainer_config(overrides)
    if cfg is None:
        return None
    world = args.world_size or (args.nnodes * args.nproc_per_node if args.nproc_per_node else None)
    try:
        return trainer_view(cfg, world, args.node_rank)
    except AttributeError as exc:  # the trainer's schema moved under us: fall back to options
        print(
            f"preflight: warning: trainer config layout not understood ({exc}); checks use the options only",
            file=sys.stderr,
        )
        return None


def _check_node(rep: Report, args: argparse.Namespace, view: TrainerView | None) -> None:
    """Versions, GPU stack and count, fla; the config's device and precision tighten the GPU checks."""
    check_versions(rep)
    if args.vendor:
        check_vendor(rep, args.vendor)
    required_by = None  # what makes a GPU necessary here
    if args.require_gpu:
        required_by = "--require-gpu was given"
    elif view is not None and view.device == "cuda":
        required_by = "train.device=cuda needs one"
    check_gpus(
        rep,
        nproc_per_node=args.nproc_per_node,
        required_by=required_by,
        # bf16-mixed computes in bf16 too (autocast)
        require_bf16=not args.no_bf16_check and (view is None or view.precision in ("bf16", "bf16-mixed")),
    )
    check_fla(rep, require_fla=args.require_fla)


def _check_trainer_config(rep: Report, args: argparse.Namespace, plan: Plan) -> None:
    """The config's problems, and a --checkpoint-dir the trainer would not write to."""
    view = plan.view
    if view is None:
        if not args.no_config:
            rep.warn(
                "no trainer config in this checkout (configs/config.yaml): checkpoint dir and model from options only"
            )
        return
    rep.ok(
        f"trainer config composed ({' '.join(plan.overrides) or 'defaults'}): checkpoints in {view.checkpoint_dir}, "
        f"precision {view.precision}, device {view.device}"
    )
    for problem in view.problems:
        rep.fail(f"trainer config: {problem}")
    trainer_ckpt = view.checkpoint_dir.expanduser().absolute()
    if plan.ckpt_arg is not None and plan.ckpt_arg != trainer_ckpt:
        rep.fail(
            f"--checkpoint-dir {plan.ckpt_arg} but the trainer will write checkpoints to "
            f"{trainer_ckpt} (checkpoint.dir, else run.dir/checkpoints): "
            f"add the override checkpoint.dir={plan.ckpt_arg}"
        )


def _check_checkpoint_dir(rep: Report, args: argparse.Namespace, plan: Plan) -> None:
    """Writable, room for the checkpoints, shared by all nodes."""
    if plan.ckpt is None:
        rep.warn("no --checkpoint-dir: writable/shared/free-space checks skipped")
        return
    with leaving_no_new_dirs(plan.ckpt, enabled=args.nnodes == 1):
        if not check_writable(rep, plan.ckpt):
            return
        keep = args.keep_checkpoints or (plan.view.keep if plan.view else 2)
        check_disk(rep, plan.ckpt, plan.params, keep, plan.source)
        check_shared(
            rep,
            plan.ckpt,
            shared_id=args.shared_id,
            node_rank=args.node_rank,
            nnodes=args.nnodes,
            timeout=args.shared_timeout,
        )
