"""The decode benchmark's rows: one (model, batch size)'s times and memory, the row of a batch that
did not fit, and RetNet's speedup over each baseline."""

from __future__ import annotations

from typing import Optional

import torch

from ..components.metrics import device_figures

GIB = 1024**3
# (arch of a baseline's rows, its name in the speedup row)
BASELINES = (("transformer", "transformer"), ("llama_hf_generate", "hf_llama"), ("fla_retnet_hf_generate", "fla_hf"))


def hbm_bandwidth(name: Optional[str] = None) -> Optional[float]:
    """HBM bytes/s of one torch device (components/metrics.py DEVICE_FIGURES), for the weight-read bound
    of a decode step; `name` defaults to the current device's."""
    if name is None:
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    figures = device_figures(name)
    return figures.hbm_bandwidth if figures else None


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def decode_row(model, decoder, setup: dict, prefill_s: float, decode_s: float) -> dict:
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
        "weights_gib": round(weight_bytes(model) / GIB, 3),
    }


def memory_over_weights(weights: int, state_bytes: int, base: int, prefill_peak: int, ms_step: float) -> dict:
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


def oom_row(arch: str, batch: int, prompt_len: int, error: Exception) -> dict:
    """The row of a batch that did not fit: the error's first line."""
    return {"arch": arch, "batch": batch, "prompt_len": prompt_len, "oom": str(error).split("\n")[0][:200]}


def speedup_rows(rows: list, batches: list, prompt_len: int) -> list:
    """Per batch size: RetNet's tokens/s over each baseline's in `rows` (None where it did not fit)."""
    by = {(r["arch"], r["batch"], r["prompt_len"]): r for r in rows if "arch" in r}
    out = []
    for b in batches:
        ret = by.get(("retnet", b, prompt_len))
        if not (ret and "tokens_per_s" in ret):
            continue
        summary = {"summary": "speedup", "batch": b, "retnet_tokens_per_s": ret["tokens_per_s"]}
        for arch, key in BASELINES:
            other = by.get((arch, b, prompt_len))
            if other:
                summary[f"{key}_tokens_per_s"] = other.get("tokens_per_s", "oom")
                summary[f"speedup_vs_{key}"] = (
                    round(ret["tokens_per_s"] / other["tokens_per_s"], 2) if "tokens_per_s" in other else None
                )
        out.append(summary)
    return out
