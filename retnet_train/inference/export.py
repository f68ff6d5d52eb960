"""Export a checkpoint: our own format, or fla's Hugging Face RetNet format.

    python -m retnet_train.inference.export --checkpoint runs/x --out export/x
    python -m retnet_train.inference.export --checkpoint runs/x --out export/x-fla --format fla

native: model.safetensors (consolidated weights) + config.json ({"format": "retnet-train",
        "model": <preset dict>}) + tokenizer.model; loadable by generate/evaluate (inference/native.py).
fla:    config.json (model_type "retnet") + model.safetensors for fla's RetNetForCausalLM
        + tokenizer.model, refused where fla's RetNet is not exactly ours (interop/fla.py says when).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from ..interop.fla import ExportError, save_fla
from .cli import DTYPES, add_checkpoint_args, load_from_args
from .errors import CheckpointError
from .native import save_native


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m retnet_train.inference.export", description=__doc__.split("\n")[0])
    add_checkpoint_args(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", choices=["native", "fla"], default="native")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="weights on disk (default: float32)")
    p.add_argument("--allow-inexact", action="store_true", help="fla: export a normalize_retention model anyway")
    p.add_argument("--overwrite", action="store_true")
    return p.parse_args(argv)


def _source(args, loaded) -> dict:
    """Where the export came from, recorded in its config.json."""
    facts = {k: v for k, v in loaded.meta.items() if isinstance(v, (str, int, type(None)))}
    return {"checkpoint": os.path.abspath(args.checkpoint), **facts}


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.path.exists(args.out) and os.listdir(args.out) and not args.overwrite:
        raise SystemExit(f"error: --out: {args.out} exists and is not empty (pass --overwrite)")
    try:
        loaded = load_from_args(args)
        dtype = getattr(torch, args.dtype) if args.dtype else None
        if args.format == "native":
            save_native(loaded.model, args.out, loaded.tokenizer_path, dtype, extra={"source": _source(args, loaded)})
        else:
            save_fla(loaded.model, args.out, loaded.tokenizer_path, dtype, args.allow_inexact)
    except (CheckpointError, ExportError, ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    if loaded.tokenizer_path is None:
        print(f"warning: no tokenizer written ({args.checkpoint} names none; pass --tokenizer)", file=sys.stderr)
    print(f"exported {args.format} model ({loaded.model.num_params() / 1e6:.1f}M parameters) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
