"""Decode benchmark: RetNet (recurrent step, CUDA graph) vs the Transformer (KV cache, SDPA),
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
import gc
import json
import sys
import time
from typing import Optional

import torch

from ..inference.decoding import CudaGraphStep, make_decoder
from .presets import fla_reference, load_preset

# HBM bandwidth (bytes/s) by device name, for the weight-read bound of one decode step.
HBM_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "MI300X": 5.3e12, "MI250X": 3.2e12}
GIB = 1024**3


def hbm_bandwidth() -> Optional[float]:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((v for k, v in HBM_BANDWIDTH.items() if k in name), None)


def build(preset: str, device: str, dtype: torch.dtype):
    from ..model import build_model

    cfg = load_preset(preset)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # initialize on the device: no 27 GB fp32 copy on the host
            model = build_model(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(on_gpu: bool) -> None:
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()


def _timed(device, fn, *args, **kwargs):
    """(fn(*args, **kwargs), its wall seconds): the device's queued work is finished before the clock
    starts and included when it stops."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    _sync(device)
    return out, time.perf_counter() - t0


def _weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@torch.no_grad()
def bench_one(
    model,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    cuda_graph: bool,
    device: str,
    state_dtype: torch.dtype = torch.float32,
    compile_step: bool = False,
    prefill_piece: int = 0,
) -> dict:
    """Prefill a random prompt, then decode new_tokens greedily: one row of times and memory."""
    on_gpu = torch.device(device).type == "cuda"
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=device, generator=gen)
    base = torch.cuda.memory_allocated() if on_gpu else 0
    _reset_peak(on_gpu)
    decoder = make_decoder(model, batch, prompt_len + new_tokens + 1, state_dtype)
    step = _ready_step(model, decoder, batch, device, cuda_graph, compile_step)
    _reset_peak(on_gpu)
    logits, prefill_s = _timed(device, decoder.prefill, ids, piece=prefill_piece)
    prefill_peak = torch.cuda.max_memory_allocated() - base if on_gpu else None
    model.check_inputs = False  # no host sync inside the step
    tokens = logits.argmax(-1)
    _reset_peak(on_gpu)
    _, decode_s = _timed(device, _greedy, step, tokens, new_tokens)
    model.check_inputs = True
    setup = dict(batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, cuda_graph=cuda_graph)
    row = _decode_row(model, decoder, {**setup, "compiled_step": compile_step}, prefill_s, decode_s)
    if on_gpu:
        ms_step = 1000 * decode_s / new_tokens
        row.update(_memory_over_weights(_weight_bytes(model), decoder.state_bytes(), base, prefill_peak, ms_step))
    del decoder, step
    return row


def _ready_step(model, decoder, batch: int, device: str, cuda_graph: bool, compile_step: bool):
    """The decode step, captured as a CUDA graph (or warmed up) before the prefill, which then
    overwrites every buffer the step reads."""
    model.check_inputs = False  # no host sync inside the step
    step = CudaGraphStep(decoder, compile=compile_step) if cuda_graph else decoder.step
    if not cuda_graph:
        decoder.step(torch.zeros(batch, dtype=torch.long, device=device))
    model.check_inputs = True
    return step


def _greedy(step, tokens, new_tokens: int):
    for _ in range(new_tokens):
        tokens = step(tokens).argmax(-1)  # greedy on the device: no host round trip
    return tokens


def _decode_row(model, decoder, setup: dict, prefill_s: float, decode_s: float) -> dict:
    """setup: batch, prompt_len, new_tokens and how the step ran, in the row's order."""
    arch, batch, new_tokens = model.config.arch, setup["batch"], setup["new_tokens"]
    return {
        "arch": arch,
        "params_b": round(model.num_params() / 1e9, 3),
        **setup,
        "prefill_s": round(prefill_s, 3),
        "ms_per_step": round(1000 * decode_s / new_tokens, 3),
        "tokens_per_s": round(batch * new_tokens / decode_s, 1),
        "state_dtype": str(decoder.states[0].dtype).replace("torch.", "") if arch == "retnet" else None,
        "state_bytes": decoder.state_bytes(),
        "state_gib": round(decoder.state_bytes() / GIB, 3),
        "weights_gib": round(_weight_bytes(model) / GIB, 3),
    }


def _memory_over_weights(weights: int, state_bytes: int, base: int, prefill_peak: int, ms_step: float) -> dict:
    """GPU peaks over the weights, and the step against reading weights and state once from HBM."""
    out = {
        "decode_peak_over_weights_gib": round((torch.cuda.max_memory_allocated() - base) / GIB, 3),
        "prefill_peak_over_weights_gib": round(prefill_peak / GIB, 3),
    }
    bw = hbm_bandwidth()
    if bw:
        limit_ms = 1000 * (weights + state_bytes) / bw  # weights and state are read once a step
        out["weights_only_limit_ms"] = round(1000 * weights / bw, 3)
        out["weight_read_limit_ms"] = round(limit_ms, 3)
        out["step_over_limit"] = round(ms_step / limit_ms, 2)
    return out


def hf_llama(cfg):
    """Hugging Face Llama (KV cache, SDPA) at the Transformer preset's size, SwiGLU width 2/3 of its
    MLP's (Llama-7B's 11008 at 6.7B)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    inter = 256 * round(2 * cfg.ffn_dim / 3 / 256)
    return LlamaForCausalLM(
        LlamaConfig(
            hidden_size=cfg.d_model,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_heads,
            intermediate_size=inter,
            vocab_size=cfg.vocab_size,
            max_position_embeddings=16384,
            attn_implementation="sdpa",
        )
    )


# fla_reference: fla's RetNet through Hugging Face generate.
HF_REFERENCES = {"fla_retnet_hf_generate": fla_reference, "llama_hf_generate": hf_llama}


@torch.no_grad()
def bench_hf_generate(
    arch: str, cfg, batch: int, prompt_len: int, new_tokens: int, device: str, dtype: torch.dtype
) -> dict:
    """A Hugging Face model through `generate` (greedy, cache on), random weights at the preset's
    size. Decode time = full generate minus a 1-token generate (the prefill)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = HF_REFERENCES[arch](cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    weights = _weight_bytes(model)
    ids = torch.randint(1, cfg.vocab_size, (batch, prompt_len), device=device)
    # an all-ones mask, as a tokenizer would hand it to generate (fla then takes its varlen path)
    kw = dict(do_sample=False, use_cache=True, pad_token_id=0, attention_mask=torch.ones_like(ids))
    warm = {**kw, "attention_mask": kw["attention_mask"][:, :128]}
    model.generate(ids[:, :128], max_new_tokens=4, min_new_tokens=4, **warm)  # warm-up (Triton autotuning)
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = {}
    for n in (1, new_tokens):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        torch.cuda.synchronize()
        times[n] = time.perf_counter() - t0
    decode_s = times[new_tokens] - times[1]
    row = {
        "arch": arch,
        "params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "prefill_s": round(times[1], 3),
        "ms_per_step": round(1000 * decode_s / (new_tokens - 1), 3),
        "tokens_per_s": round(batch * (new_tokens - 1) / decode_s, 1),
        "weights_gib": round(weights / GIB, 3),
        "peak_over_weights_gib": round((torch.cuda.max_memory_allocated() - base) / GIB, 3),
    }
    del model
    return row


def run(model, args, batch: int, prompt_len: int, cuda_graph: bool) -> dict:
    try:
        return bench_one(
            model,
            batch,
            prompt_len,
            args.new_tokens,
            cuda_graph,
            args.device,
            getattr(torch, args.state_dtype),
            args.compile_step,
            args.prefill_piece,
        )
    except torch.cuda.OutOfMemoryError as e:
        return _oom_row(model.config.arch, batch, prompt_len, e)
    finally:
        _free_memory(args.device)


def _oom_row(arch: str, batch: int, prompt_len: int, error: Exception) -> dict:
    """The row of a batch that did not fit: the error's first line."""
    return {"arch": arch, "batch": batch, "prompt_len": prompt_len, "oom": str(error).split("\n")[0][:200]}


def _free_memory(device: str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def speedup_rows(rows: list, batches: list, prompt_len: int) -> list:
    """Per batch size: RetNet's tokens/s over each baseline's in `rows` (None where it did not fit)."""
    by = {(r["arch"], r["batch"], r["prompt_len"]): r for r in rows if "arch" in r}
    out = []
    for b in batches:
        ret = by.get(("retnet", b, prompt_len))
        if not (ret and "tokens_per_s" in ret):
            continue
        summary = {"summary": "speedup", "batch": b, "retnet_tokens_per_s": ret["tokens_per_s"]}
        for arch, key in (
            ("transformer", "transformer"),
            ("llama_hf_generate", "hf_llama"),
            ("fla_retnet_hf_generate", "fla_hf"),
        ):
            other = by.get((arch, b, prompt_len))
            if other:
                summary[f"{key}_tokens_per_s"] = other.get("tokens_per_s", "oom")
                summary[f"speedup_vs_{key}"] = (
                    round(ret["tokens_per_s"] / other["tokens_per_s"], 2) if "tokens_per_s" in other else None
                )
        out.append(summary)
    return out


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
    p.add_argument("--no-cuda-graph", action="store_true", help="plain eager steps for both models")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument(
        "--state-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="RetNet recurrent state: fp32 as fla keeps it; bf16 halves the state traffic per step but is "
        "lossy (a decay of 1 - 2^-20 rounds to 1 in bf16), for speed-of-light comparison only",
    )
    p.add_argument(
        "--prefill-piece", type=int, default=0, help="RetNet: prefill in pieces of this many tokens (0: whole prompt)"
    )
    p.add_argument("--compile-step", action="store_true", help="torch.compile the step before CUDA-graph capture")
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
    p.add_argument("--output", help="also write all rows here (JSON lines)")
    return p.parse_args(argv)


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
    _free_memory(args.device)


def bench_reference(arch: str, preset: str, args, batches: list, dtype: torch.dtype, emit) -> None:
    """A Hugging Face generate reference at `preset`'s size, at each batch size."""
    cfg = load_preset(preset)
    for b in batches:
        try:
            row = bench_hf_generate(arch, cfg, b, args.prompt_len, args.new_tokens, args.device, dtype)
            emit({"preset": preset, **row})
        except torch.cuda.OutOfMemoryError as e:
            emit({"preset": preset, **_oom_row(arch, b, args.prompt_len, e)})
        _free_memory(args.device)


if __name__ == "__main__":
    sys.exit(main())
