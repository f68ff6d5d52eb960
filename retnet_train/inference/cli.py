"""What the generate, export and evaluate CLIs share: the checkpoint and device options, checked and
turned into a loaded model; every bad value is a CheckpointError naming the option. Their stdout holds
their results alone (text, a JSON line), so that it can be piped: every log goes to stderr."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import Optional

import torch

from ..model import model_config_from_dict
from .errors import CheckpointError, SettingError
from .framing import PROMPT_PREFIXES
from .load import LoadedModel, load_model
from .native import is_export_dir

DTYPES = ("float32", "bfloat16", "float16")


class CommandParser(argparse.ArgumentParser):
    """argparse's parser whose errors (a mistyped, unknown or missing flag) are one line naming the flag,
    as the commands' own errors are; argparse printed its whole usage first (19 lines for generate).
    The status stays argparse's 2; --help shows the usage."""

    def error(self, message: str):
        self.exit(2, f"error: {message.removeprefix('argument ')} (--help lists the options)\n")


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a run dir, a DeepSpeed save dir (with 'latest'), a checkpoint tag dir, or an export dir",
    )
    p.add_argument(
        "--tag",
        help="which checkpoint: step_N or N (the trainer's step_0000000N), or a directory name such as "
        "global_step200 (default: the newest complete one); not for an export",
    )
    p.add_argument("--tokenizer", help="sentencepiece model (default: the one stored with the checkpoint)")
    p.add_argument(
        "--model-config", help="model preset YAML, for DeepSpeed checkpoints that carry no config; not for an export"
    )


def add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda, cuda:N or cpu (default: cuda when a GPU is visible, else cpu)",
    )
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: bfloat16 on GPU, float32 on CPU")


def add_prompt_prefix_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prompt-prefix",
        choices=PROMPT_PREFIXES,
        default="auto",
        help="how the training documents started: bos (BOS doc EOS), none (doc EOS); auto (default): as the "
        "checkpoint records, else BOS when the tokenizer has one",
    )


def compute_dtype(name: Optional[str], device: str) -> torch.dtype:
    """--dtype, else bfloat16 on a GPU and float32 on the CPU."""
    if name:
        return getattr(torch, name)
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def check_device(name: str) -> torch.device:
    """--device parsed, and present on this machine."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise CheckpointError(f"--device {name!r}: {e}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise CheckpointError(f"--device {name}: no CUDA/ROCm device visible; use --device cpu")
        if device.index is not None and device.index >= count:
            raise CheckpointError(f"--device {name}: only {count} GPU(s) visible")
    return device


def read_model_config(path: str) -> dict:
    """--model-config: a model preset YAML (configs/model/*.yaml), read as Hydra reads it (OmegaConf's
    YAML: `1e-6` is a float, which YAML 1.1 reads as a string)."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except OSError as e:
        raise CheckpointError(f"--model-config: {e}") from None
    except (yaml.YAMLError, UnicodeDecodeError, OmegaConfBaseException) as e:
        raise CheckpointError(f"--model-config {path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(config, dict):
        raise CheckpointError(
            f"--model-config {path}: expected a mapping of model keys (a configs/model preset), "
            f"got {type(config).__name__}"
        )
    try:
        model_config_from_dict(config)
    except ValueError as e:
        raise CheckpointError(f"--model-config {path}: {e}") from None
    return config


def flag_error(e: SettingError) -> SystemExit:
    """A library setting's error as the command line's: each such setting is the flag of its name with
    dashes (top_p: --top-p)."""
    return SystemExit(f"error: --{e.name.replace('_', '-')}: {e.problem}")


def deepspeed_logs_to_stderr() -> None:
    """DeepSpeed's logger writes to stdout, from its import on (its accelerator choice, a warning on a
    host without a GPU): import it with stdout sent to stderr, then point the logger's stdout handlers
    at stderr, where they stay for the rest of the command (also when DeepSpeed was imported before)."""
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.utils.logging import logger
    for handler in logger.handlers:
        if type(handler) is logging.StreamHandler and handler.stream in (sys.stdout, sys.__stdout__):
            handler.setStream(sys.stderr)


def load_from_args(args: argparse.Namespace, device: str = "cpu", dtype: Optional[torch.dtype] = None) -> LoadedModel:
    check_device(device)
    model_config = read_model_config(args.model_config) if args.model_config else None
    if not is_export_dir(args.checkpoint):  # a DeepSpeed checkpoint, read with DeepSpeed (an export: none)
        deepspeed_logs_to_stderr()
    return load_model(
        args.checkpoint, tag=args.tag, tokenizer=args.tokenizer, model_config=model_config, device=device, dtype=dtype
    )
