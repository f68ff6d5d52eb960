r"""Text generation from a training checkpoint or an exported model.

    python -m retnet_train.inference.generate --checkpoint runs/tiny --prompt "def f(" \
        --max-new-tokens 64 --temperature 0.8 --top-p 0.95
    python -m retnet_train.inference.generate --checkpoint export/ --prompts-file prompts.txt --greedy \
        --batch-size 16

Chunkwise prefill of the (left-padded) batch, then one token per step: RetNet with its
recurrent state (constant memory per sequence), the Transformer with a KV cache. Greedy,
temperature, top-k and top-p sampling; each row stops at EOS; text is streamed to stdout
(one prompt: as it is produced; several: each as soon as it is finished, its first line starting with
"[index] "); --jsonl: one JSON line per prompt when it is finished (index, prompt, completion).
Prompts are generated --batch-size at a time: decoding memory grows with the batch. A prompt starts
as the model's training documents started (--prompt-prefix, inference/framing.py).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import partial
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .cli import (
    CommandParser,
    add_checkpoint_args,
    add_device_args,
    add_prompt_prefix_arg,
    compute_dtype,
    flag_error,
    load_from_args,
)
from .decoding import CudaGraphStep, left_pad, make_decoder
from .errors import CheckpointError, SettingError
from .framing import chosen_framing, prompt_tokens
from .sampling import SamplingParams, prompt_generators, sample
from .streaming import TextStreamer

FLAGS_OF_BOUNDS = ("--max-new-tokens", "--max-length")  # check_prompts' names of them on the command line


@dataclass
class GenerationResult:
    tokens: List[List[int]]  # new tokens per prompt, without the EOS
    stopped_at_eos: List[bool]
    steps: int


def check_prompts(
    prompts: Sequence[Sequence[int]],
    vocab_size: int,
    max_new_tokens: int,
    max_length: Optional[int],
    labels: Optional[Sequence[str]] = None,
    names: Tuple[str, str] = ("max_new_tokens", "max_length"),
) -> None:
    """A non-empty batch of non-empty prompts of in-vocabulary ids that, with max_new_tokens, fit max_length.
    labels name the prompts in errors (default: prompt 0, prompt 1, ...), names the two bounds (a command
    line: its flags)."""
    if not prompts:
        raise ValueError("prompts: empty batch")
    for i, p in enumerate(prompts):
        label = labels[i] if labels else f"prompt {i}"
        if len(p) == 0:
            raise ValueError(f"{label}: empty (no tokens; the tokenizer has no BOS to start from)")
        bad = [t for t in p if not 0 <= int(t) < vocab_size]
        if bad:
            raise ValueError(f"{label}: token id {bad[0]} outside the vocabulary [0, {vocab_size})")
        if max_length is not None and len(p) + max_new_tokens > max_length:
            raise ValueError(f"{label}: {len(p)} tokens + {names[0]}={max_new_tokens} exceeds {names[1]}={max_length}")


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    eos_id: Optional[int] = None,
    pad_id: int = 0,
    max_length: Optional[int] = None,
    cuda_graph: bool = False,
    prefill_piece: int = 0,
    on_step: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None,
    generator=None,  # a torch.Generator, or a list of one per prompt
    document_end_id: Optional[int] = None,
) -> GenerationResult:
    """Generate for a batch of token-id prompts. max_length bounds prompt + new tokens (None:
    no bound for RetNet; the Transformer's KV cache is sized to prompt + max_new_tokens).
    on_step(tokens [B], finished [B]) is called after each new token (for streaming). Samples are
    drawn from generator: one for all rows or one per row (default: per row, seeded from params.seed and
    the row's index; without a seed, torch's global one).
    document_end_id: the token after it, in a prompt or generated, starts a document, as in training (with
    the config's document_masking): the generate command's EOS."""
    cfg = model.config
    params.validate(cfg.vocab_size)
    check_prompts(prompts, cfg.vocab_size, params.max_new_tokens, max_length)
    longest = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    if generator is None and params.seed is not None:
        generator = prompt_generators(params.seed, 0, len(prompts), device)
    B = len(prompts)
    decoder = make_decoder(model, B, longest + params.max_new_tokens)
    document_end_id = document_end_id if cfg.document_masking else None
    ids, starts, _ = left_pad(prompts, pad_id, device, document_end_id)
    # captured before the prefill, which then overwrites every buffer the graph reads
    step = CudaGraphStep(decoder) if cuda_graph else decoder.step
    resets = any(len(p) < longest for p in prompts) or bool(starts[:, 1:].any())
    logits = decoder.prefill(ids, starts if resets else None, piece=prefill_piece)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    eos_hit = torch.zeros(B, dtype=torch.bool, device=device)
    out = []
    starting = _document_starts(ids[:, -1], document_end_id)
    check_inputs, model.check_inputs = model.check_inputs, False
    try:
        for n in range(params.max_new_tokens):
            tokens = sample(logits, params, generator)
            if eos_id is not None:
                hit = (tokens == eos_id) & ~finished
                eos_hit |= hit
                finished |= hit
            tokens = torch.where(finished, torch.full_like(tokens, pad_id if eos_id is None else eos_id), tokens)
            out.append(torch.where(finished, -1, tokens))
            if on_step is not None:
                on_step(tokens, finished)
            if bool(finished.all()) or n == params.max_new_tokens - 1:
                break
            logits = step(tokens, starting)
            starting = _document_starts(tokens, document_end_id)
    finally:
        model.check_inputs = check_inputs
    table = torch.stack(out, dim=1).cpu().tolist()
    return GenerationResult([[t for t in row if t >= 0] for row in table], eos_hit.cpu().tolist(), len(out))


def _document_starts(tokens: torch.Tensor, document_end_id: Optional[int]) -> Optional[torch.Tensor]:
    """Which rows' next token starts a document: those whose token [B] ends one (None: no document ends)."""
    return None if document_end_id is None else tokens == document_end_id


def generate_in_batches(model, prompts, params: SamplingParams, batch_size: int, streamer: TextStreamer, **kw) -> None:
    """generate() on batch_size prompts at a time, each streamed under its index in `prompts` and sampled
    from its own generator (params.seed and that index): any batch size samples the same text."""
    device = next(model.parameters()).device
    for lo in range(0, len(prompts), batch_size):
        batch = prompts[lo : lo + batch_size]
        generators = None if params.seed is None else prompt_generators(params.seed, lo, len(batch), device)
        generate(model, batch, params, generator=generators, on_step=partial(streamer, first_row=lo), **kw)
        streamer.close(range(lo, lo + len(batch)))


def parse_args(argv=None):
    p = CommandParser(prog="python -m retnet_train.inference.generate", description=__doc__.split("\n")[0])
    add_checkpoint_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    src.add_argument("--prompts-file", help="one prompt per line (blank lines are skipped)")
    p.add_argument(
        "--batch-size", type=int, default=8, help="prompts at a time, memory grows with it (default: %(default)s)"
    )
    p.add_argument("--max-new-tokens", type=int, default=128, help="default: %(default)s")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (same as --temperature 0)")
    p.add_argument("--temperature", type=float, default=1.0, help="default: %(default)s")
    p.add_argument("--top-k", type=int, default=0, help="default: %(default)s (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="default: %(default)s (1: off)")
    p.add_argument("--seed", type=int, default=0, help="default: %(default)s: the same command samples the same text")
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="bound on prompt + new tokens (default: none for RetNet, 32768 for the Transformer)",
    )
    p.add_argument(
        "--no-stop-at-eos", action="store_true", help="go on past the EOS token to --max-new-tokens (a new document)"
    )
    p.add_argument(
        "--jsonl", action="store_true", help="one JSON line per prompt (index, prompt, completion) instead of text"
    )
    add_prompt_prefix_arg(p)
    add_device_args(p)
    p.add_argument("--cuda-graph", action="store_true", help="capture the decode step in a CUDA graph")
    p.add_argument(
        "--prefill-piece", type=int, default=0, help="feed long prompts in pieces of this many tokens (0: whole)"
    )
    return p.parse_args(argv)


def _read_prompts(args) -> List[Tuple[str, str]]:
    """(label naming the prompt in errors, text) per prompt; the label's index is the output's tag."""
    if not args.prompts_file:
        return [(f"prompt {i} (--prompt)", text) for i, text in enumerate(args.prompt)]
    try:
        with open(args.prompts_file) as f:
            lines = [(n, line.rstrip("\n")) for n, line in enumerate(f, start=1) if line.strip()]
    except OSError as e:
        raise SystemExit(f"error: --prompts-file: {e}") from None
    except UnicodeDecodeError as e:
        raise SystemExit(f"error: --prompts-file {args.prompts_file}: not UTF-8 text ({e})") from None
    if not lines:
        raise SystemExit(f"error: --prompts-file: {args.prompts_file} has no prompts")
    return [(f"prompt {i} (--prompts-file {args.prompts_file} line {n})", text) for i, (n, text) in enumerate(lines)]


def _framed_prompts(sp, texts: Sequence[str], prompt_prefix: str, recorded: Optional[bool]) -> List[List[int]]:
    """Token ids of each prompt, started as the training documents started (inference/framing.py)."""
    framing = chosen_framing(prompt_prefix, recorded)
    try:
        return [prompt_tokens(sp.encode(t), framing, sp.bos_id(), sp.eos_id()) for t in texts]
    except ValueError as e:
        raise SystemExit(f"error: --prompt-prefix {prompt_prefix}: {e}") from None


def _sampling_params(args) -> SamplingParams:
    """The sampling flags and the bounds, checked before the model is loaded (--top-k against the vocabulary
    and --max-length against the prompts: after)."""
    for flag, value in (("--batch-size", args.batch_size), ("--max-length", args.max_length)):
        if value is not None and value < 1:
            raise SystemExit(f"error: {flag}: must be >= 1, got {value}")
    if args.prefill_piece < 0:
        raise SystemExit(
            f"error: --prefill-piece: must be >= 0 (0: the whole prompt at once), got {args.prefill_piece}"
        )
    if args.cuda_graph and not args.device.startswith("cuda"):
        raise SystemExit(f"error: --cuda-graph: needs a CUDA device (--device cuda), got --device {args.device}")
    params = SamplingParams(
        args.max_new_tokens, 0.0 if args.greedy else args.temperature, args.top_k, args.top_p, args.seed
    )
    try:
        params.validate()
    except SettingError as e:
        raise flag_error(e) from None
    return params


def _load(args):
    """(loaded model, its sentencepiece tokenizer)."""
    try:
        loaded = load_from_args(args, args.device, compute_dtype(args.dtype, args.device))
    except (CheckpointError, ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    if loaded.tokenizer_path is None:
        raise SystemExit(
            f"error: --tokenizer: {args.checkpoint} names no tokenizer; pass the sentencepiece model used in training"
        )
    import sentencepiece as spm

    return loaded, spm.SentencePieceProcessor(model_file=loaded.tokenizer_path)


def main(argv=None) -> int:
    args = parse_args(argv)
    params = _sampling_params(args)
    labels, texts = zip(*_read_prompts(args))  # a bad prompts file fails before the model loads
    loaded, sp = _load(args)
    prompts = _framed_prompts(sp, texts, args.prompt_prefix, loaded.documents_start_with_bos)
    max_length = args.max_length
    if max_length is None and loaded.config.arch == "transformer":
        max_length = 32768
    eos = sp.eos_id() if sp.eos_id() >= 0 and not args.no_stop_at_eos else None
    streamer = TextStreamer(sp, len(prompts), jsonl_prompts=list(texts) if args.jsonl else None)
    try:
        params.validate(loaded.config.vocab_size)
        check_prompts(prompts, loaded.config.vocab_size, params.max_new_tokens, max_length, labels, FLAGS_OF_BOUNDS)
        generate_in_batches(
            loaded.model,
            prompts,
            params,
            args.batch_size,
            streamer,
            eos_id=eos,
            pad_id=max(sp.pad_id(), 0),
            max_length=max_length,
            cuda_graph=args.cuda_graph,
            prefill_piece=args.prefill_piece,
            document_end_id=sp.eos_id() if sp.eos_id() >= 0 else None,  # training starts a document after each
        )
    except SettingError as e:
        raise flag_error(e) from None
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
