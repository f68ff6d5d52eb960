"""bench.quality's models and command-line options: every option says in --help what it does and its
default (docs/quality.md's recipe)."""

from __future__ import annotations

import argparse

MODELS = {  # name: (model preset, with {size}; the table's description)
    "retnet": ("{size}", "RetNet, the paper's block"),
    "retnet_fla": ("retnet_fla_{size}", "RetNet, fla-style block (RMSNorm, SwiGLU)"),
    "transformer": ("transformer_{size}", "Transformer twin (LayerNorm, GELU MLP, torchscale init)"),
    "transformer_pp": ("transformer_pp_{size}", "Transformer++ (RMSNorm, SwiGLU, RoPE, normal init std 0.02)"),
    "llama": ("transformer_pp_{size}", "Hugging Face LlamaForCausalLM (init std 0.02), plain torch loop"),
}
DEFAULT_MODELS = ("retnet", "transformer", "transformer_pp", "llama")


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m retnet_train.bench.quality",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_inputs(p)
    _add_schedule(p)
    _add_numerics(p)
    _add_run_options(p)
    return p


def _add_inputs(p: argparse.ArgumentParser) -> None:
    """Data, output and which models at which size."""
    p.add_argument("--data", nargs="+", required=True, help="shard directories (data_prep.tokenize's OUT/NAME)")
    p.add_argument("--tokenizer", default=None, help="the shards' tokenizer.model (checked against their manifest)")
    p.add_argument("--out", required=True, help="output directory (runs/, quality.jsonl, quality.md, curves.png)")
    p.add_argument(
        "--models",
        nargs="+",
        default=list(DEFAULT_MODELS),
        help=f"from {list(MODELS)}, each optionally NAME:key=value,... (model preset overrides; default: %(default)s)",
    )
    p.add_argument("--size", default="125m", help="preset size: tiny, 125m, 1.3b, ... (default: %(default)s)")


def _add_schedule(p: argparse.ArgumentParser) -> None:
    """Tokens, batch, learning rate and evaluation: the same for every model."""
    p.add_argument(
        "--tokens",
        type=float,
        default=50_000_000,
        help="training tokens per model, rounded down to steps (default: 50,000,000)",
    )
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--batch-tokens", type=int, default=262_144, help="tokens per optimizer step (default: %(default)s)")
    p.add_argument("--micro-batch", type=int, default=32, help="sequences per forward (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=40, help="linear warm-up steps (default: %(default)s)")
    p.add_argument(
        "--min-lr-ratio", type=float, default=0.1, help="cosine decay to this fraction of --lr (default: %(default)s)"
    )
    p.add_argument("--log-interval", type=int, default=10, help="steps between log lines (default: %(default)s)")
    p.add_argument("--eval-interval", type=int, default=20, help="steps between validations (default: %(default)s)")
    p.add_argument(
        "--eval-batches", type=int, default=8, help="validation micro-batches per evaluation (default: %(default)s)"
    )


def _add_numerics(p: argparse.ArgumentParser) -> None:
    """ZeRO stage, precision, gradient accumulation dtype, compile, device and seed."""
    p.add_argument("--zero-stage", type=int, default=1, help="our models' DeepSpeed ZeRO stage (default: %(default)s)")
    p.add_argument(
        "--precision",
        default="bf16",
        choices=("bf16", "bf16-mixed", "fp32"),
        help="deepspeed.precision of our models (docs/training.md#precision); the plain loop runs autocast bf16 "
        "for both bf16 and bf16-mixed (default: %(default)s)",
    )
    p.add_argument(
        "--grad-accum-dtype",
        default="null",
        choices=("fp32", "null"),
        help="our models' deepspeed.grad_accum_dtype: fp32 sums the micro-batches' gradients in fp32, as the "
        "plain loop does (its autocast keeps fp32 gradients; bf16 needs --zero-stage 1); null: DeepSpeed's "
        "default, in the weights' dtype (bf16) (default: %(default)s)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="torch.compile the models, as the trainer's train.compile (default: %(default)s)",
    )
    p.add_argument(
        "--device", default="auto", choices=("auto", "cuda", "cpu"), help="where to train (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=1234, help="every model's train.seed (default: %(default)s)")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--override", action="append", default=[], help="a further trainer override for every model")
    p.add_argument(
        "--paired-init",
        action="store_true",
        help="transformer_pp starts from the llama loop's initial weights (same seed, loaded with interop.llama), "
        "so the two rows differ in the training code only",
    )
    p.add_argument("--overwrite", action="store_true", help="train models whose run directory exists again")
