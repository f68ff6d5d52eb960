r"""Evaluate a checkpoint: validation perplexity over token shards, and lm-evaluation-harness tasks.

    python -m retnet_train.inference.evaluate --checkpoint runs/x --data data/sample/shards \
        [--seq-len N] --batch-size 8 [--max-sequences 512]
    python -m retnet_train.inference.evaluate --checkpoint export/x --tasks hellaswag,lambada_openai [--limit 100]
    python -m retnet_train.inference.evaluate --checkpoint export/x --tasks my_task --include-path my_tasks/

Perplexity runs the model as training does (packed windows of the shards' validation split,
document masking by EOS) and reports the token-weighted mean loss, perplexity and bits per
token, with the same of each source under "sources" when --data names several, and the settings it
measured with (seq_len: by default the trained data.seq_len, where the checkpoint records it). Shards of another
tokenizer are refused. The results, with which weights they measure (measured_weights), are one JSON
line: all of stdout.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
import time
import warnings
from typing import Mapping, Optional

import torch

from ..components.checkpoint_discovery import tag_step
from ..components.validation import mean_loss
from ..components.validation import perplexity as loss_perplexity
from ..data import ManifestError, build_validation_loader, sha256_file
from .cli import (
    CommandParser,
    add_checkpoint_args,
    add_device_args,
    add_prompt_prefix_arg,
    compute_dtype,
    load_from_args,
)
from .errors import CheckpointError
from .framing import chosen_framing

DEFAULT_SEQ_LEN = 2048  # --seq-len where the checkpoint records no data.seq_len


def perplexity(
    model, batches, device: str | torch.device = "cpu", max_batches: Optional[int] = None, sources=None
) -> dict:
    """Token-weighted mean next-token loss over `batches` (dicts of input_ids/labels/doc_starts), as the
    trainer's validation computes it, with its perplexity and bits per token; with `sources` (the source
    of each batch, ValidationLoader.batch_sources) naming more than one, the same of each under "sources"."""
    t0 = time.perf_counter()
    result = mean_loss(model, batches, device, max_batches, sources=sources)
    if result.tokens == 0:
        raise ValueError("perplexity: no tokens evaluated (empty validation data)")
    out = {**_scores(result), "batches": result.batches, "seconds": round(time.perf_counter() - t0, 3)}
    if len(result.by_source) > 1:
        out["sources"] = {name: _scores(r) for name, r in result.by_source.items()}
    return out


def _scores(result) -> dict:
    return {
        "loss": result.loss,
        "perplexity": loss_perplexity(result.loss),
        "bits_per_token": result.loss / math.log(2),
        "tokens": result.tokens,
    }


def parse_data(specs) -> dict:
    """--data DIR or NAME=DIR (repeatable) -> {name: (dir, 1.0)} for the validation loader. A DIR is named as
    the trainer names a source (components/config.data_sources): after its directory, '_' added while taken."""
    sources = {}
    for spec in specs:
        # a directory as given is a path even with '=' in it (lang=en/); else NAME is up to the first '='
        name, eq, path = ("", "", spec) if os.path.isdir(spec) or "=" not in spec else spec.partition("=")
        if eq and not name:
            raise ValueError(f"--data {spec}: an empty name before '='")
        if not os.path.isdir(path):
            raise ValueError(f"--data {spec}: {path} is not a directory (a shard dir written by data_prep.tokenize)")
        if not name:
            name = os.path.basename(os.path.normpath(path)) or "data"
            while name in sources:
                name += "_"
        if name in sources:  # a dict keeps only the last: one source would silently go unevaluated
            raise ValueError(f"--data {spec}: the name {name!r} is given twice")
        sources[name] = (path, 1.0)
    return sources


def parse_args(argv=None):
    p = CommandParser(prog="python -m retnet_train.inference.evaluate", description=__doc__.split("\n")[0])
    add_checkpoint_args(p)
    p.add_argument(
        "--data", action="append", default=[], help="shard dir (or NAME=DIR), repeatable: validation perplexity"
    )
    p.add_argument(
        "--seq-len", type=int, default=None, help=f"default: the checkpoint's data.seq_len (else {DEFAULT_SEQ_LEN})"
    )
    p.add_argument(
        "--batch-size", type=int, default=8, help="sequences (lm-eval: requests) per forward (default: %(default)s)"
    )
    p.add_argument(
        "--max-sequences", type=int, default=None, help="perplexity over about this many windows (default: all)"
    )
    p.add_argument("--tasks", help="comma-separated lm-eval task names")
    p.add_argument("--include-path", help="directory of extra lm-eval task YAMLs")
    p.add_argument("--limit", type=float, default=None, help="lm-eval: examples per task (or fraction)")
    p.add_argument(
        "--num-fewshot", type=int, default=None, help="lm-eval: examples in each prompt (default: the task's)"
    )
    p.add_argument(
        "--max-length", type=int, default=2048, help="lm-eval: context window in tokens (default: %(default)s)"
    )
    p.add_argument(
        "--bootstrap-iters",
        type=int,
        default=100_000,
        help="lm-eval: resamples for the standard errors (default: lm-eval's, %(default)s; 0: none)",
    )
    add_prompt_prefix_arg(p)
    add_device_args(p)
    p.add_argument("--output", help="write the JSON results here as well (a new file)")
    p.add_argument("--overwrite", action="store_true", help="--output may replace an existing file")
    return p.parse_args(argv)


def trained_seq_len(loaded) -> Optional[int]:
    """The data.seq_len the weights were trained at, where the checkpoint (or the export's source) records it."""
    seq_len = loaded.checkpoint_facts.get("seq_len")
    return seq_len if isinstance(seq_len, int) else None


def check_every_source_measured(sources: dict, batch_sources, notes) -> None:
    """Each --data source has batches: one the loader leaves out (its warning in `notes` says why) would
    leave the results another source's alone, their `data` naming both."""
    measured = set(batch_sources)
    for name, (path, _) in sources.items():
        if name not in measured:
            why = next((note for note in notes if f"'{name}'" in note), "no validation window of it")
            raise ValueError(f"--data {name}={path}: not measured: {why}")


def run_perplexity(loaded, sources: dict, args) -> Mapping:
    sha = sha256_file(loaded.tokenizer_path) if loaded.tokenizer_path else None
    seq_len = args.seq_len or trained_seq_len(loaded) or DEFAULT_SEQ_LEN
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = build_validation_loader(
            sources,
            seq_len,
            args.batch_size,
            tokenizer_sha256=sha,
            vocab_size=loaded.config.vocab_size,
            max_sequences=args.max_sequences,
        )
    check_every_source_measured(sources, loader.batch_sources, [str(w.message) for w in caught])
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    measured = perplexity(loaded.model, loader, args.device, sources=loader.batch_sources)
    settings = {"seq_len": seq_len, "batch_size": args.batch_size, "max_sequences": args.max_sequences}
    return {**measured, **settings, "data": {name: path for name, (path, _) in sources.items()}}


def run_lm_eval(loaded, args) -> Mapping:
    from .lm_eval_adapter import RetNetTrainLM, simple_evaluate

    if loaded.tokenizer_path is None:
        raise ValueError(f"--tokenizer: {args.checkpoint} names no tokenizer; lm-eval needs one")
    lm = RetNetTrainLM(
        loaded.model,
        loaded.tokenizer_path,
        max_length=args.max_length,
        batch_size=args.batch_size,
        documents_start_with_bos=chosen_framing(args.prompt_prefix, loaded.documents_start_with_bos),
    )
    try:
        return simple_evaluate(
            lm,
            args.tasks.split(","),
            include_path=args.include_path,
            limit=args.limit,
            num_fewshot=args.num_fewshot,
            bootstrap_iters=args.bootstrap_iters,
        )
    except KeyError as e:  # lm-eval's error for a task name it does not know
        raise ValueError(f"--tasks: {e.args[0] if e.args else e}") from None


def measured_weights(loaded, checkpoint: str) -> dict:
    """Which weights the results measure: checkpoint_path, the checkpoint read (in a run or checkpoints
    dir: the one chosen) or the export; checkpoint_tag and checkpoint_step, its trainer tag and step (an
    export's: those of the checkpoint it was exported from, where its config.json records them)."""
    deepspeed = loaded.source == "deepspeed"
    path = os.path.join(loaded.meta["save_dir"], loaded.meta["tag"]) if deepspeed else os.path.abspath(checkpoint)
    facts = loaded.checkpoint_facts
    tag = facts.get("tag")
    step = tag_step(tag) if isinstance(tag, str) else None
    # the trainer's step is in its tag; DeepSpeed's own tags (global_stepN): its count of steps
    return {
        "checkpoint_path": path,
        "checkpoint_tag": tag,
        "checkpoint_step": step if step is not None else facts.get("global_steps"),
    }


def check_output(path: str, overwrite: bool = False) -> None:
    """--output, checked before the evaluation runs: a new file (an existing one only with --overwrite) in
    an existing, writable directory."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise SystemExit(f"error: --output: {path} is a directory; name a file")
    if os.path.lexists(path) and not overwrite:
        raise SystemExit(f"error: --output: {path} exists (--overwrite replaces it)")
    if not os.path.isdir(parent):
        raise SystemExit(f"error: --output: {parent} is not a directory")
    if not os.access(parent, os.W_OK):
        raise SystemExit(f"error: --output: {parent} is not writable")


def check_lm_eval_flags(args) -> None:
    """The lm-eval flags, before anything loads: each must do something."""
    if args.bootstrap_iters < 0:
        raise SystemExit(f"error: --bootstrap-iters: must be >= 0 (0: no standard errors), got {args.bootstrap_iters}")
    if args.tasks is not None and not all(name.strip() for name in args.tasks.split(",")):
        raise SystemExit(f"error: --tasks: an empty task name in {args.tasks!r}")
    if args.include_path and not os.path.isdir(args.include_path):
        raise SystemExit(f"error: --include-path: {args.include_path} is not a directory")
    for flag in ("limit", "num_fewshot", "include_path"):
        if getattr(args, flag) is not None and not args.tasks:
            raise SystemExit(f"error: --{flag.replace('_', '-')}: only with --tasks (lm-eval)")
    if args.prompt_prefix != "auto" and not args.tasks:
        raise SystemExit("error: --prompt-prefix: only with --tasks (perplexity reads the shards as they were written)")
    if args.tasks is not None:
        try:  # before the model loads and the perplexity runs, whose results an error would lose
            importlib.import_module(f"{__package__}.lm_eval_adapter")
        except ImportError as e:
            raise SystemExit(
                f"error: --tasks: lm-evaluation-harness is not installed ({e}); pip install -e '.[eval]' "
                "in the repository (or pip install 'lm-eval>=0.4.13')"
            ) from None


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.data and not args.tasks:
        raise SystemExit("error: nothing to evaluate: pass --data (perplexity) and/or --tasks (lm-eval)")
    for name in ("seq_len", "batch_size", "max_length", "max_sequences"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')}: must be >= 1, got {value}")
    check_lm_eval_flags(args)
    if args.output:
        check_output(args.output, args.overwrite)
    elif args.overwrite:
        raise SystemExit("error: --overwrite: only with --output")
    try:
        sources = parse_data(args.data)
        loaded = load_from_args(args, args.device, compute_dtype(args.dtype, args.device))
        results = {"checkpoint": args.checkpoint, **measured_weights(loaded, args.checkpoint)}
        if args.data:
            results["validation"] = run_perplexity(loaded, sources, args)
        if args.tasks:
            results["lm_eval"] = run_lm_eval(loaded, args)
    except (CheckpointError, ManifestError, ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    text = json.dumps(results, default=str)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
