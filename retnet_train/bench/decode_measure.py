"""The decode benchmark's measurement of our models: prefill a random prompt, then decode greedily
(CUDA-graph captured or eager steps), timed and with the GPU's memory peaks."""

from __future__ import annotations

import gc
import time
from contextlib import contextmanager

import torch

from ..inference.decoding import CudaGraphStep, make_decoder
from .decode_rows import decode_row, memory_over_weights, oom_row, weight_bytes
from .presets import load_preset


@contextmanager
def init_on(device: str, dtype: torch.dtype):
    """Modules built inside are initialized on `device` in `dtype`."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # initialize on the device: no 27 GB fp32 copy on the host
            yield
    finally:
        torch.set_default_dtype(prev)


def build(preset: str, device: str, dtype: torch.dtype):
    from ..model import build_model

    cfg = load_preset(preset)
    with init_on(device, dtype):
        model = build_model(cfg)
    return model.eval()


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def reset_peak(on_gpu: bool) -> None:
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()


def timed(device, fn, *args, **kwargs):
    """(fn(*args, **kwargs), its wall seconds): the device's queued work is finished before the clock
    starts and included when it stops."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    _sync(device)
    return out, time.perf_counter() - t0


def free_memory(device: str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def run(model, args, batch: int, prompt_len: int, cuda_graph: bool) -> dict:
    """bench_one with the command line's settings: an OOM row where the batch does not fit."""
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
        return oom_row(model.config.arch, batch, prompt_len, e)
    finally:
        free_memory(args.device)


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
    reset_peak(on_gpu)
    decoder = make_decoder(model, batch, prompt_len + new_tokens + 1, state_dtype)
    step = _ready_step(model, decoder, batch, device, cuda_graph, compile_step)
    reset_peak(on_gpu)
    logits, prefill_s = timed(device, decoder.prefill, ids, piece=prefill_piece)
    prefill_peak = torch.cuda.max_memory_allocated() - base if on_gpu else None
    model.check_inputs = False  # no host sync inside the step
    tokens = logits.argmax(-1)
    reset_peak(on_gpu)
    _, decode_s = timed(device, _greedy, step, tokens, new_tokens)
    model.check_inputs = True
    setup = dict(batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, cuda_graph=cuda_graph)
    row = decode_row(model, decoder, {**setup, "compiled_step": compile_step}, prefill_s, decode_s)
    if on_gpu:
        ms_step = 1000 * decode_s / new_tokens
        row.update(memory_over_weights(weight_bytes(model), decoder.state_bytes(), base, prefill_peak, ms_step))
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
