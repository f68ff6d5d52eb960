"""Export a checkpoint: our own format, or fla's Hugging Face RetNet format.

    python -m retnet_train.inference.export --checkpoint runs/x --out export/x
    python -m retnet_train.inference.export --checkpoint runs/x --out export/x-fla --format fla

native: model.safetensors (consolidated weights) + config.json ({"format": "retnet-train",
        "model": <preset dict>, "documents_start_with_bos": ...}) + tokenizer.model; loadable by
        generate/evaluate (inference/native.py).
fla:    config.json (model_type "retnet") + model.safetensors for fla's RetNetForCausalLM
        + tokenizer.model, refused where fla's RetNet is not exactly ours (interop/fla.py says when).
"""

from __future__ import annotations

import os
import shutil
import sys

import torch

from ..interop.fla import ExportError, save_fla
from .cli import DTYPES, CommandParser, add_checkpoint_args, load_from_args
from .errors import CheckpointError
from .framing import FRAMING_KEY
from .native import EXPORT_CONFIG, EXPORT_FILES, save_native, written_by_an_export


def parse_args(argv=None):
    p = CommandParser(prog="python -m retnet_train.inference.export", description=__doc__.split("\n")[0])
    add_checkpoint_args(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--format",
        choices=["native", "fla"],
        default="native",
        help="native (default): this repository's, for generate and evaluate; fla: fla's Hugging Face RetNet",
    )
    p.add_argument("--dtype", choices=DTYPES, default=None, help="weights on disk (default: float32)")
    p.add_argument("--allow-inexact", action="store_true", help="fla: export a normalize_retention model anyway")
    p.add_argument("--overwrite", action="store_true", help="replace a previous export in --out (never other files)")
    return p.parse_args(argv)


def _source(args, loaded) -> dict:
    """Where the export came from, recorded in its config.json: the training checkpoint's facts (tag,
    step, data.seq_len). An export of an export keeps the training checkpoint its source records, so that
    evaluate still finds the trained seq_len and the step of the weights."""
    if loaded.source == "export" and loaded.checkpoint_facts:
        return loaded.checkpoint_facts
    facts = {k: v for k, v in loaded.meta.items() if isinstance(v, (str, int, type(None)))}
    return {"checkpoint": os.path.abspath(args.checkpoint), **facts}


def _export_facts(args, loaded) -> dict:
    """What config.json records besides the model: its source and how the training documents started."""
    return {"source": _source(args, loaded), FRAMING_KEY: loaded.documents_start_with_bos}


def check_out(out: str, overwrite: bool) -> None:
    """--out must be a new directory, or with --overwrite one holding a previous export and nothing else."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise CheckpointError(f"--out: {out} is a file, not a directory; name a new directory")
    ancestor = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise CheckpointError(f"--out: {ancestor} is a file, so {out} cannot be created")
    written = out if os.path.isdir(out) else ancestor
    if not os.access(written, os.W_OK):
        raise CheckpointError(f"--out: {written} is not writable")
    present = set(os.listdir(out)) if os.path.isdir(out) else set()
    if present and not overwrite:
        raise CheckpointError(f"--out: {out} exists and is not empty (--overwrite replaces a previous export)")
    others = sorted(present - set(EXPORT_FILES))
    if others:
        raise CheckpointError(
            f"--out: {out} holds files an export does not write ({', '.join(others[:3])}); "
            "--overwrite replaces a previous export only"
        )
    if present and not written_by_an_export(out):  # export file names, but not an export's config.json
        raise CheckpointError(
            f"--out: {out} is not a previous export (its {EXPORT_CONFIG} is not one an export wrote); "
            "--overwrite replaces a previous export only"
        )


def write_export(out: str, write) -> None:
    """write(dir) into a sibling of `out`, then its files into `out`: a failed export leaves no partial
    directory and a previous export unchanged (files of it the new one lacks are removed)."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(os.path.abspath(out))}.partial-{os.getpid()}")
    os.mkdir(staging)
    try:
        write(staging)
        if not os.path.isdir(out):
            os.rename(staging, out)
            return
        for name in EXPORT_FILES:
            if os.path.exists(os.path.join(staging, name)):
                os.replace(os.path.join(staging, name), os.path.join(out, name))
            elif os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
        os.rmdir(staging)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging)


def parameter_count(n: int) -> str:
    """n for the result line: exact under a million (a tiny model's 41,280 is not 0.0M), else M or B."""
    if n < 1_000_000:
        return f"{n:,}"
    if round(n / 1e6, 1) < 1000:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e9:.2f}B"


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_out(args.out, args.overwrite)
        loaded = load_from_args(args)
        dtype = getattr(torch, args.dtype) if args.dtype else None
        if args.format == "native":
            write_export(
                args.out,
                lambda d: save_native(loaded.model, d, loaded.tokenizer_path, dtype, extra=_export_facts(args, loaded)),
            )
        else:
            write_export(
                args.out, lambda d: save_fla(loaded.model, d, loaded.tokenizer_path, dtype, args.allow_inexact)
            )
    except (CheckpointError, ExportError, ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    if loaded.tokenizer_path is None:
        print(f"warning: no tokenizer written ({args.checkpoint} names none; pass --tokenizer)", file=sys.stderr)
    print(f"exported {args.format} model ({parameter_count(loaded.model.num_params())} parameters) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
