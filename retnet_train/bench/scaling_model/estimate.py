"""One configuration's whole estimate: memory by phase, communication, step time."""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, replace
from typing import Optional

from ...components.config import checkpointing_mode
from ...components.optim import overlaps_comm
from .comm import collective_bus_bytes, comm_ops, context_parallel_state_bytes
from .memory import (
    _is_retnet,
    activation_bytes_per_token_per_layer,
    activation_fixed_bytes,
    backward_working_bytes,
    bucket_bytes,
    grads_held_bytes_per_param,
    loss_forward_transient_bytes,
    param_counts,
    step_transient_bytes,
    zero3_working_set_bytes,
    zero_bytes_per_param,
)
from .settings import BF16, GLOBAL_BATCH_TOKENS, DeepSpeedSettings, GiB, Hardware, bus_bandwidth


@functools.lru_cache(maxsize=None)
def _model_flops_per_token(cfg_json: str, seq_len: int) -> tuple:
    """model/flops.py's counts (6N; 6N plus the retention/attention matmuls), cached per config."""
    from ...model import model_config_from_dict
    from ...model.flops import flops_per_token

    f = flops_per_token(model_config_from_dict(json.loads(cfg_json)), seq_len)
    return f["six_n"], f["model"]


def estimate(
    cfg,
    n_gpus: int,
    seq_len: int = 8192,
    micro_batch: int = 1,
    zero_stage: int = 1,
    checkpointing="none",
    context_parallel: int = 1,
    ds: Optional[DeepSpeedSettings] = None,
    hw: Hardware = Hardware(),
    global_batch_tokens: int = GLOBAL_BATCH_TOKENS,
    grad_accum: Optional[int] = None,
    backend: str = "fla",
    n_params: Optional[int] = None,
) -> dict:
    """Per-GPU memory (bytes; peak = the largest of the forward, backward and optimizer-step peaks)
    and per-step communication and compute time for one configuration."""
    ds = ds or DeepSpeedSettings.trainer()
    checkpointing = checkpointing_mode(checkpointing)
    P_cp = context_parallel
    if P_cp < 1 or n_gpus % P_cp or seq_len % P_cp:
        raise ValueError(f"context parallel {P_cp} must divide the GPUs ({n_gpus}) and the sequence ({seq_len})")
    if P_cp > 1 and not _is_retnet(cfg):
        raise ValueError("context parallelism is modeled for RetNet only (its state is what is passed)")
    dp = n_gpus // P_cp  # data-parallel replicas; ZeRO shards over all n_gpus ranks
    if grad_accum is None:
        grad_accum = max(1, global_batch_tokens // (micro_batch * seq_len * dp))
    P = n_params if n_params is not None else param_counts(cfg)["total"]
    tokens = micro_batch * seq_len // P_cp  # per GPU per micro-batch
    seq_local = seq_len // P_cp

    per = zero_bytes_per_param(zero_stage, n_gpus)
    states = P * (per["params"] + per["master"] + per["optimizer"])
    grads_held = P * grads_held_bytes_per_param(zero_stage, n_gpus, grad_accum)
    ds = replace(ds, overlap_comm=overlaps_comm(ds.overlap_comm, n_gpus))  # as the trainer's config
    buckets = bucket_bytes(zero_stage, ds)
    zero3 = zero3_working_set_bytes(cfg, ds) if zero_stage == 3 else 0.0
    act_layers = cfg.n_layers * tokens * activation_bytes_per_token_per_layer(cfg, backend, BF16, checkpointing)
    act_fixed = activation_fixed_bytes(cfg, tokens, seq_local)
    bwd_work = backward_working_bytes(cfg, tokens, backend, BF16, checkpointing)
    loss_tmp = loss_forward_transient_bytes(cfg, tokens)
    step_tmp = step_transient_bytes(zero_stage, n_gpus, P, ds.sub_group_size)
    base = states + grads_held + zero3 + buckets  # buckets: allocated at the first backward, kept
    peaks = {
        "forward": base + act_layers + act_fixed + loss_tmp,
        "backward": base + act_layers + act_fixed + bwd_work,
        "optimizer_step": states + P * per["grads"] + step_tmp,
    }
    phase = max(peaks, key=peaks.get)
    memory = {
        "params": P * per["params"],
        "grads": P * per["grads"],
        "master": P * per["master"],
        "optimizer": P * per["optimizer"],
        "grads_held_during_backward": grads_held,
        "reduce_buckets": buckets,
        "zero3_gathered": zero3,
        "activations": act_layers + act_fixed,
        "backward_working": bwd_work,
        "loss_transient": loss_tmp,
        "step_fp32_grads": step_tmp,
        # what stays allocated between steps (bench/train_throughput.py's resident_gib)
        "resident": states + (P * per["grads"] if zero_stage >= 2 else 0.0),
        "peak": peaks[phase],
        "peak_phase": phase,
        "peaks": peaks,
    }

    # communication and compute, per GPU per optimizer step
    bw = bus_bandwidth(n_gpus, hw)  # ZeRO's collectives span all ranks (data- x context-parallel)
    ops = []
    for name, kind, payload, times, hide in comm_ops(zero_stage, P, grad_accum):
        b = collective_bus_bytes(kind, payload, n_gpus) * times
        ops.append({"name": name, "collective": kind, "bytes": b, "seconds": b / bw if b else 0.0, "overlaps": hide})
    if P_cp > 1:
        b = 2 * cfg.n_layers * context_parallel_state_bytes(cfg, micro_batch) * grad_accum
        ops.append(
            {
                "name": "context-parallel state (p2p)",
                "collective": "p2p",
                "bytes": b,
                "seconds": b / bus_bandwidth(P_cp, hw),
                "overlaps": "none",
            }
        )
    six_n, flops = _model_flops_per_token(json.dumps(cfg.to_dict(), sort_keys=True), seq_len)
    executed = flops
    if checkpointing == "full":
        executed = flops * 4 / 3  # one more forward
    elif checkpointing == "selective" and _is_retnet(cfg):
        executed = flops + (flops - six_n) / 3  # the retention matmuls' forward once more
    t_micro = tokens * executed / (hw.peak_flops * hw.utilization)
    t_fwd = t_micro / (4 if checkpointing == "full" else 3)  # backward = 2 forwards (+1 recomputed under AC)
    t_bwd = t_micro - t_fwd
    compute = t_micro * grad_accum
    exposed = 0.0
    per_micro = {"forward": 0.0, "backward": 0.0}
    for op in ops:
        if op["overlaps"] in per_micro:
            per_micro[op["overlaps"]] += op["seconds"] / grad_accum
        elif op["overlaps"] == "backward_last":
            exposed += max(0.0, op["seconds"] - t_bwd)
        else:
            exposed += op["seconds"]
    exposed += grad_accum * (max(0.0, per_micro["forward"] - t_fwd) + max(0.0, per_micro["backward"] - t_bwd))
    comm_s = sum(op["seconds"] for op in ops)
    comm = {
        "ops": ops,
        "bytes": sum(op["bytes"] for op in ops),
        "seconds": comm_s,
        "bus_bandwidth_gbyte_s": bw / 1e9,
        "exposed_seconds": exposed,
    }
    step_s = compute + exposed
    return {
        "model": cfg.arch,
        "params": P,
        "gpus": n_gpus,
        "data_parallel": dp,
        "context_parallel": P_cp,
        "zero_stage": zero_stage,
        "activation_checkpointing": checkpointing,
        "seq_len": seq_len,
        "micro_batch": micro_batch,
        "grad_accum": grad_accum,
        "tokens_per_step": micro_batch * seq_len * dp * grad_accum,
        "backend": backend,
        "memory": memory,
        "memory_gib": {k: v / GiB for k, v in memory.items() if isinstance(v, float)},
        "comm": comm,
        "compute": {
            "flops_per_token": flops,
            "utilization": hw.utilization,
            "seconds": compute,
            "forward_s_per_micro": t_fwd,
            "backward_s_per_micro": t_bwd,
        },
        "step_seconds": step_s,
        "step_seconds_no_overlap": compute + comm_s,
        "tokens_per_s_per_gpu": micro_batch * seq_len // P_cp * grad_accum / step_s,
        "fits": memory["peak"] / GiB <= hw.memory_gib * 0.95,
        "deepspeed": asdict(ds),
        "hardware": asdict(hw),
    }
