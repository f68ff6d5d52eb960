"""lm-evaluation-harness model adapter for our checkpoints (RetNet or the Transformer).

In Python:  simple_evaluate(RetNetTrainLM(model, "tokenizer.model"), ["hellaswag"])
From lm-eval: importing this module registers the model as "retnet-train", so
    lm_eval --model retnet-train --model_args checkpoint=export/x,max_length=2048 --tasks ...
works from a script that imported it; `python -m retnet_train.inference.evaluate --tasks ...` does this.

Every context starts as the model's training documents started (inference/framing.py): after BOS,
or after an EOS with a document start right after it, as the training loader marks them.
loglikelihood: context + continuation in one causal pass (right-padded batches: padding after
a row cannot change its logits); the context is cut from the left to fit max_length.
loglikelihood_rolling: lm-eval's disjoint rolling windows of max_length tokens.
generate_until: our generate() (greedy unless do_sample), cut at the first stop string; its settings
(inference/lm_eval_gen_kwargs.py) are checked as the generate command's flags are (top_p 0 is refused, not
read as off), and a key our generate() cannot follow is refused, naming it.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ..data.loader import document_starts
from .framing import context_prefix, read_framing
from .generate import generate
from .lm_eval_gen_kwargs import read_generation_kwargs
from .sampling import SamplingParams


@register_model("retnet-train")
class RetNetTrainLM(LM):
    def __init__(
        self,
        model=None,
        tokenizer: Optional[str] = None,
        max_length: int = 2048,
        batch_size: int = 8,
        max_gen_toks: int = 256,
        checkpoint: Optional[str] = None,
        device: Optional[str] = None,
        dtype: Optional[str] = None,
        documents_start_with_bos: Optional[bool] = None,
    ):
        """documents_start_with_bos: how the model's training documents started (None: not known; a
        checkpoint's own record when built from checkpoint=...)."""
        super().__init__()
        # --model_args are checked before a checkpoint is read
        self.max_length = _model_arg_count("max_length", max_length)
        self.max_gen_toks = _model_arg_count("max_gen_toks", max_gen_toks)  # where a request gives none
        self.batch_size = _batch_size(batch_size)
        if model is None:  # built by lm-eval from --model_args
            if checkpoint is None:
                raise ValueError("retnet-train: pass checkpoint=<DeepSpeed dir or export dir> in --model_args")
            from .cli import compute_dtype
            from .load import load_model

            device = _usable_device(device)
            torch_dtype = compute_dtype(dtype, device)
            loaded = load_model(checkpoint, tokenizer=tokenizer, device=device, dtype=torch_dtype)
            model, tokenizer = loaded.model, loaded.tokenizer_path
            if documents_start_with_bos is None:
                documents_start_with_bos = loaded.documents_start_with_bos
        if tokenizer is None:
            raise ValueError("retnet-train: a sentencepiece tokenizer is required (tokenizer=...)")
        import sentencepiece as spm

        self.model = model.eval()
        self.sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
        if self.sp.get_piece_size() != model.config.vocab_size:
            raise ValueError(
                f"tokenizer {tokenizer}: {self.sp.get_piece_size()} pieces, model vocab_size={model.config.vocab_size}"
            )
        self._device = next(model.parameters()).device  # (LM.device is a read-only property)
        # token that stands before the first real token (lm-eval's prefix_token_id), and whether the
        # token after it starts a document (it is an EOS)
        framing = read_framing(documents_start_with_bos, "retnet-train")
        self.prefix_id, self.starts_after_prefix = context_prefix(framing, self.sp.bos_id(), self.sp.eos_id())
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.pad_id = max(self.sp.pad_id(), 0)

    # lm-eval builds the model with one of these (its CLI: create_from_arg_obj with a dict of --model_args);
    # of its own settings only batch_size and device apply (max_batch_size etc. do not)
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: Optional[dict] = None):
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k in ("batch_size", "device")}
        return cls(**{**arg_dict, **extra})

    # --- tokens -------------------------------------------------------------------------------
    def tok_encode(self, text: str) -> List[int]:
        return self.sp.encode(text)

    def _encode_pair(self, context: str, continuation: str) -> Tuple[List[int], List[int]]:
        # lm-eval convention: trailing spaces of the context belong to the continuation
        n_space = len(context) - len(context.rstrip())
        if n_space:
            context, continuation = context[:-n_space], context[-n_space:] + continuation
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return ctx, whole[len(ctx) :]

    # --- scoring ------------------------------------------------------------------------------
    @torch.no_grad()
    def _score(self, pairs: Sequence[Tuple[List[int], List[int]]], add_prefix: bool = True) -> List[Tuple[float, bool]]:
        """(sum log p(continuation | context), continuation is the greedy one) per pair.
        add_prefix: start every context with the prefix token (a document start, as in training)."""
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        results: List[Optional[Tuple[float, bool]]] = [None] * len(pairs)
        for lo in range(0, len(order), self.batch_size):
            idx = order[lo : lo + self.batch_size]
            rows, spans = [], []
            for i in idx:
                ctx, cont = pairs[i]
                if not cont:
                    raise ValueError("loglikelihood: empty continuation")
                if len(cont) > self.max_length:  # the window is cut from the left: it would cut the answer
                    raise ValueError(
                        f"max_length={self.max_length} (--max-length): a continuation of {len(cont)} tokens "
                        "does not fit in the window; raise it"
                    )
                full = (([self.prefix_id] if add_prefix else []) + list(ctx) + list(cont))[-(self.max_length + 1) :]
                rows.append(full[:-1])
                spans.append((len(full) - 1 - len(cont), list(cont)))
            T = max(len(r) for r in rows)
            ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
            for j, r in enumerate(rows):
                ids[j, : len(r)] = torch.tensor(r)
            logits = self.model(ids.to(self._device), doc_starts=self._doc_starts(ids)).logits
            logp = F.log_softmax(logits.float(), dim=-1)
            for j, (start, cont) in enumerate(spans):
                lp = logp[j, start : start + len(cont)]
                target = torch.tensor(cont, device=lp.device)
                results[idx[j]] = (float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
        return results

    def _doc_starts(self, ids: torch.Tensor) -> Optional[torch.Tensor]:
        """True where the previous token is the EOS prefix, as the training loader marks them (None:
        the prefix starts no document after it)."""
        if not self.starts_after_prefix:
            return None
        return torch.from_numpy(document_starts(ids.numpy(), self.prefix_id)).to(self._device)

    def loglikelihood(self, requests) -> List[Tuple[float, bool]]:
        pairs = []
        for req in requests:
            context, continuation = req.args
            pairs.append(self._encode_pair(context, continuation))
            if not pairs[-1][1]:
                shown = context if len(context) <= 40 else "..." + context[-40:]
                why = (
                    "it is empty"
                    if not continuation
                    else f"{context + continuation!r} has no more tokens than the context (the tokenizer joins the "
                    "continuation to the context's last token)"
                )
                raise ValueError(
                    f"loglikelihood: the continuation {continuation!r} of the context {shown!r} has no token of its "
                    f"own: {why}"
                )
        return self._score(pairs)

    def loglikelihood_rolling(self, requests) -> List[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for req in requests:
            tokens = self.tok_encode(req.args[0])
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_id, max_seq_len=self.max_length, context_len=1
                )
            ]
            # the first window's context is the prefix token itself; later ones are the tokens before
            scores = self._score(windows, add_prefix=False)
            out.append(sum(s for s, _ in scores))
        return out

    def _gen_params(self, gen_kwargs) -> Tuple[SamplingParams, List[str]]:
        return read_generation_kwargs(gen_kwargs, self.max_gen_toks, self.max_length, self.model.config.vocab_size)

    def generate_until(self, requests) -> List[str]:
        """Requests with equal generation arguments run as one left-padded batch of batch_size."""
        groups: dict = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted((req.args[1] or {}).items())), []).append(i)
        out: List[Optional[str]] = [None] * len(requests)
        for idx in groups.values():
            params, until = self._gen_params(requests[idx[0]].args[1])
            keep = self.max_length - params.max_new_tokens  # >= 1: read_generation_kwargs checks
            for lo in range(0, len(idx), self.batch_size):
                part = idx[lo : lo + self.batch_size]
                prompts = [([self.prefix_id] + self.tok_encode(requests[i].args[0]))[-keep:] for i in part]
                res = generate(
                    self.model,
                    prompts,
                    params,
                    eos_id=self.eos_id,
                    pad_id=self.pad_id,
                    document_end_id=self.prefix_id if self.starts_after_prefix else None,
                )
                for i, tokens in zip(part, res.tokens):
                    text = self.sp.decode(tokens)
                    out[i] = text[: min([text.find(s) for s in until if s and s in text], default=len(text))]
        return out


def simple_evaluate(
    lm: RetNetTrainLM,
    tasks: List[str],
    include_path: Optional[str] = None,
    limit: Optional[float] = None,
    num_fewshot: Optional[int] = None,
    bootstrap_iters: int = 100_000,
) -> dict:
    """lm_eval.simple_evaluate with our adapter; returns the per-task metrics ("results"). bootstrap_iters:
    for the standard errors, lm-eval's command-line default (accuracy's is closed-form; 0: none)."""
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=include_path) if include_path else TaskManager()
    res = evaluator.simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=tm,
        log_samples=False,
        bootstrap_iters=bootstrap_iters,
    )
    if res is None:
        raise ValueError(f"lm-eval returned nothing for tasks {tasks}")
    return res["results"]


def _usable_device(device: Optional[str]) -> str:
    """--device (lm-eval's default is cuda:0): refused, naming the option, where no GPU is visible."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"retnet-train: --device {device!r} is not a torch device (cpu, cuda, cuda:1)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"retnet-train: --device {device}, but no CUDA device is visible; pass --device cpu")
    return device


def _model_arg_count(key: str, value) -> int:
    """A count of tokens from --model_args (lm-eval parses the string: an int, a float or a str)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not number.is_integer():
        raise ValueError(f"retnet-train: {key}={value!r}: must be an integer")
    if number < 1:
        raise ValueError(f"retnet-train: {key}={value!r}: must be >= 1")
    return int(number)


def _batch_size(value) -> int:
    """lm-eval passes --batch_size as given ("8", or "auto" which sizes batches by trial: not supported)."""
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"retnet-train: --batch_size {value!r}: give a number of sequences (auto is not supported)"
        ) from None
    if size < 1:
        raise ValueError(f"retnet-train: --batch_size {value!r}: must be >= 1")
    return size
