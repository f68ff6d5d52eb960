"""Preflight: fail in seconds, not after the queue wait, when a node cannot train.

    python -m retnet_train.preflight --checkpoint-dir /shared/ckpt --params 1.3e9 --nproc-per-node 8
    python -m retnet_train.preflight --checkpoint-dir /shared/ckpt -- model=6.7b experiment=...
    torchrun --nproc_per_node=2 -m retnet_train.preflight --dist-check    # all_reduce across ranks

Reports torch, CUDA or ROCm, NCCL/RCCL and DeepSpeed versions, GPU count and bf16 support,
fla availability; checks that the checkpoint directory is writable, shared by all nodes and has
room for the checkpoints. Exit status 1 when a check fails, 2 on bad arguments. Without a GPU it
reports "no GPU" and passes unless --require-gpu.

The parameter count for the free-space check comes from --params, else --model-preset FILE, else
the composed trainer config or a `model=NAME` Hydra override (configs/model/NAME.yaml), counted
exactly by building the model on the meta device.

Modules: cli (options, the order of the checks, exit status), node (versions, vendor, GPUs, bf16,
fla), storage (writable, free space), shared_dir (the multi-node marker handshake), dist_check
(--dist-check), launcher_env (--from-launcher-env), trainer_config (the trainer's composed config,
parameter counts, overrides), report (the ok/warn/FAIL lines and the verdict), launch_env (SLURM
variables -> launch variables and hostfiles, `python -m retnet_train.preflight.launch_env`; torch-free,
as is this package's import). This package re-exports what the tests and callers use.
"""

import shutil  # re-exported: tests patch pf.shutil.disk_usage, which storage's free-space check calls

from .cli import _validate, build_parser, main
from .dist_check import dist_check
from .launcher_env import apply_launcher_env
from .node import check_fla, check_gpus, check_vendor, check_versions
from .report import Report, human_bytes, summarize
from .shared_dir import check_shared
from .storage import BYTES_PER_PARAM, check_disk, check_writable, leaving_no_new_dirs
from .trainer_config import (
    REPO_ROOT,
    PreflightError,
    TrainerView,
    compose_trainer_config,
    hydra_overrides,
    override_value,
    params_from_preset,
    parse_params,
    resolve_params,
    trainer_view,
)

__all__ = [
    "BYTES_PER_PARAM",
    "REPO_ROOT",
    "PreflightError",
    "Report",
    "TrainerView",
    "_validate",
    "apply_launcher_env",
    "build_parser",
    "check_disk",
    "check_fla",
    "check_gpus",
    "check_shared",
    "check_vendor",
    "check_versions",
    "check_writable",
    "leaving_no_new_dirs",
    "compose_trainer_config",
    "dist_check",
    "human_bytes",
    "hydra_overrides",
    "main",
    "override_value",
    "params_from_preset",
    "parse_params",
    "resolve_params",
    "shutil",
    "summarize",
    "trainer_view",
]
