"""What the generate, export and evaluate CLIs share: the checkpoint options and loading from them."""
from __future__ import annotations

import argparse
from typing import Optional

import torch

from .load import LoadedModel, load_model

DTYPES = ("float32", "bfloat16", "float16")


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="a run dir, a DeepSpeed save dir (with 'latest'), a checkpoint tag dir, or an export dir")
    p.add_argument("--tag", help="DeepSpeed checkpoint tag (default: the newest complete one)")
    p.add_argument("--tokenizer", help="sentencepiece model (default: the one stored with the checkpoint)")
    p.add_argument("--model-config", help="model preset YAML, for checkpoints that carry no config")


def add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: bfloat16 on GPU, float32 on CPU")


def compute_dtype(name: Optional[str], device: str) -> torch.dtype:
    """--dtype, else bfloat16 on a GPU and float32 on the CPU."""
    if name:
        return getattr(torch, name)
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def load_from_args(args: argparse.Namespace, device: str = "cpu", dtype: Optional[torch.dtype] = None) -> LoadedModel:
    import yaml

    model_config = None
    if args.model_config:
        with open(args.model_config) as f:
            model_config = yaml.safe_load(f)
    return load_model(args.checkpoint, tag=args.tag, tokenizer=args.tokenizer, model_config=model_config,
                      device=device, dtype=dtype)
