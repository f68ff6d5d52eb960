r"""Decode benchmark: RetNet (recurrent step, CUDA graph) vs the Transformer (KV cache, SDPA),
same run, same GPU, random weights at a preset's size.

    python -m retnet_train.bench.decode --preset 6.7b --baseline transformer_6.7b \
        --prompt-len 8064 --new-tokens 128 --batch-sizes 1,8,32 --check-prompt-len 1024 \
        [--hf-llama-reference] [--fla-reference]

Per (model, batch size) one JSON line: prefill seconds, decode ms/step, tokens/s, memory over
the weights (state or KV cache bytes, decode peak, prefill peak), the weight-read limit of one
step (weight bytes / HBM bandwidth) and the step's ratio to it; then RetNet/Transformer
speedups. A batch that does not fit is reported as "oom" (the Transformer's 8k KV cache at
batch 32 is 137 GB for 6.7B). --check-prompt-len reruns RetNet at a second prompt length to
show its memory over the weights does not depend on it. --hf-llama-reference and --fla-reference
add Hugging Face `generate` rows (Llama with KV cache, fla's RetNet): the usual way to decode them.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .decode_measure import build, free_memory, run
from .decode_reference import bench_hf_generate
from .decode_rows import oom_row, speedup_rows
from .presets import load_preset


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m retnet_train.bench.decode", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="6.7b", help="RetNet preset (configs/model/NAME.yaml)")
    p.add_argument("--baseline", default="transformer_6.7b", help="Transformer preset ('' to skip)")
    p.add_argument("--prompt-len", type=int, default=8064)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument(
        "--check-prompt-len", type=int, default=0, help="also run RetNet at this prompt length (memory check)"
    )
    _add_step_options(p)
    _add_reference_options(p)
    p.add_argument("--output", help="also write all rows here (JSON lines)")
    return p.parse_args(argv)


def _add_step_options(p: argparse.ArgumentParser) -> None:
    """Where and how the models decode."""
    p.add_argument("--no-cuda-graph", action="store_true", help="plain eager steps for both models")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument(
        "--state-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="RetNet recurrent state: fp32 as fla keeps it; bf16 halves the state traffic per step but is "
        "wrong (bf16 rounds a decay of 1 - 2^-9 or closer to 1: heads 4 and up never decay), for a speed bound only",
    )
    p.add_argument(
        "--prefill-piece", type=int, default=0, help="RetNet: prefill in pieces of this many tokens (0: whole prompt)"
    )
    p.add_argument("--compile-step", action="store_true", help="torch.compile the step before CUDA-graph capture")


def _add_reference_options(p: argparse.ArgumentParser) -> None:
    """The Hugging Face generate references to time beside our models."""
    p.add_argument(
        "--fla-reference",
        action="store_true",
        help="also time fla's HF RetNet generate at the preset's size (needs flash-linear-attention + transformers)",
    )
    p.add_argument(
        "--hf-llama-reference",
        action="store_true",
        help="also time Hugging Face Llama generate (KV cache, SDPA) at the baseline's size (needs transformers)",
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    batches = batch_sizes(args)
    cuda_graph = not args.no_cuda_graph and torch.device(args.device).type == "cuda"
    references = hf_references(args)
    dtype = getattr(torch, args.dtype)
    rows = []

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    for preset in [args.preset] + ([args.baseline] if args.baseline else []):
        bench_preset(preset, args, batches, dtype, cuda_graph, emit)
    for _, arch, preset in references:
        bench_reference(arch, preset, args, batches, dtype, emit)
    for row in speedup_rows(rows, batches, args.prompt_len):
        emit(row)
    if args.output:
        with open(args.output, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return 0


def batch_sizes(args) -> list:
    """--batch-sizes as integers, with --prompt-len and --new-tokens checked to be >= 1."""
    try:
        batches = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        raise SystemExit(f"error: --batch-sizes: expected comma-separated integers, got {args.batch_sizes!r}") from None
    if any(b < 1 for b in batches) or args.prompt_len < 1 or args.new_tokens < 1:
        raise SystemExit("error: --batch-sizes, --prompt-len and --new-tokens must be >= 1")
    return batches


def hf_references(args) -> list:
    """(flag, arch, preset) of each Hugging Face generate reference asked for; each needs a CUDA device
    and two new tokens at least (its decode time is a generate's minus a 1-token one)."""
    references = []
    if args.fla_reference:
        references.append(("--fla-reference", "fla_retnet_hf_generate", args.preset))
    if args.hf_llama_reference:
        references.append(("--hf-llama-reference", "llama_hf_generate", args.baseline or "transformer_6.7b"))
    for flag, _, _ in references:
        if torch.device(args.device).type != "cuda":
            raise SystemExit(f"error: {flag} needs a CUDA device")
        if args.new_tokens < 2:
            raise SystemExit(f"error: {flag} needs --new-tokens >= 2")
    return references


def bench_preset(preset: str, args, batches: list, dtype: torch.dtype, cuda_graph: bool, emit) -> None:
    """Our model of `preset` at each batch size (RetNet also at --check-prompt-len, the largest batch)."""
    model = build(preset, args.device, dtype)
    for b in batches:
        emit({"preset": preset, **run(model, args, b, args.prompt_len, cuda_graph)})
    if args.check_prompt_len and model.config.arch == "retnet":
        emit({"preset": preset, **run(model, args, max(batches), args.check_prompt_len, cuda_graph)})
    del model
    free_memory(args.device)


def bench_reference(arch: str, preset: str, args, batches: list, dtype: torch.dtype, emit) -> None:
    """A Hugging Face generate reference at `preset`'s size, at each batch size."""
    cfg = load_preset(preset)
    for b in batches:
        try:
            row = bench_hf_generate(arch, cfg, b, args.prompt_len, args.new_tokens, args.device, dtype)
            emit({"preset": preset, **row})
        except torch.cuda.OutOfMemoryError as e:
            emit({"preset": preset, **oom_row(arch, b, args.prompt_len, e)})
        free_memory(args.device)


if __name__ == "__main__":
    sys.exit(main())
