"""The decode benchmark's Hugging Face references: `generate` (greedy, cache on) of Llama with a KV
cache and of fla's RetNet, random weights at a preset's size: the usual way to decode them."""

from __future__ import annotations

import torch

from .decode_measure import init_on, timed
from .decode_rows import GIB, weight_bytes
from .presets import fla_reference, hf_size


def hf_llama(cfg):
    """Hugging Face Llama (KV cache, SDPA) at the Transformer preset's size, SwiGLU width 2/3 of its
    MLP's (Llama-7B's 11008 at 6.7B)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    inter = 256 * round(2 * cfg.ffn_dim / 3 / 256)
    return LlamaForCausalLM(
        LlamaConfig(
            **hf_size(cfg),
            num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_heads,
            intermediate_size=inter,
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
    with init_on(device, dtype):
        model = HF_REFERENCES[arch](cfg).eval()
    ids = torch.randint(1, cfg.vocab_size, (batch, prompt_len), device=device)
    base, times = _generate_times(model, ids, new_tokens, device)
    row = _generate_row(arch, model, dict(batch=batch, prompt_len=prompt_len, new_tokens=new_tokens), times, base)
    del model
    return row


def _generate_times(model, ids, new_tokens: int, device: str):
    """(memory allocated before, {n: seconds of a generate of n tokens}) for 1 and new_tokens, after a
    warm-up."""
    # an all-ones mask, as a tokenizer would hand it to generate (fla then takes its varlen path)
    kw = dict(do_sample=False, use_cache=True, pad_token_id=0, attention_mask=torch.ones_like(ids))
    warm = {**kw, "attention_mask": kw["attention_mask"][:, :128]}
    model.generate(ids[:, :128], max_new_tokens=4, min_new_tokens=4, **warm)  # warm-up (Triton autotuning)
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = {}
    for n in (1, new_tokens):
        _, times[n] = timed(device, model.generate, ids, max_new_tokens=n, min_new_tokens=n, **kw)
    return base, times


def _generate_row(arch: str, model, setup: dict, times: dict, base: int) -> dict:
    """setup: batch, prompt_len and new_tokens, in the row's order."""
    batch, new_tokens = setup["batch"], setup["new_tokens"]
    decode_s = times[new_tokens] - times[1]
    return {
        "arch": arch,
        "params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
        **setup,
        "prefill_s": round(times[1], 3),
        "ms_per_step": round(1000 * decode_s / (new_tokens - 1), 3),
        "tokens_per_s": round(batch * (new_tokens - 1) / decode_s, 1),
        "weights_gib": round(weight_bytes(model) / GIB, 3),
        "peak_over_weights_gib": round((torch.cuda.max_memory_allocated() - base) / GIB, 3),
    }
