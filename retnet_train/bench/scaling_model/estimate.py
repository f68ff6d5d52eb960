"""One configuration's whole estimate: memory by phase, communication, step time."""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple, Optional

from ...components.config import checkpointing_mode
from ...components.optim import overlaps_comm
from .comm import collective_bus_bytes, comm_ops, context_parallel_ops
from .memory import (
    _is_retnet,
    activation_bytes_per_token_per_layer,
    activation_fixed_bytes,
    backward_working_bytes,
    bucket_bytes,
    bucket_bytes_in_forward,
    grads_held_bytes_per_param,
    loss_forward_transient_bytes,
    param_counts,
    qkv_proj_params,
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


@dataclass(frozen=True)
class _StepShape:
    """How one optimizer step is laid out: P consecutive ranks share a sequence (context parallel),
    n_gpus / P data-parallel replicas; ZeRO shards over all n_gpus ranks."""

    n_gpus: int
    context_parallel: int
    seq_len: int
    micro_batch: int
    grad_accum: int
    n_params: int

    @property
    def data_parallel(self) -> int:
        return self.n_gpus // self.context_parallel

    @property
    def seq_local(self) -> int:
        return self.seq_len // self.context_parallel

    @property
    def tokens(self) -> int:
        """Per GPU per micro-batch."""
        return self.micro_batch * self.seq_len // self.context_parallel


class _WorkingBytes(NamedTuple):
    """What a step allocates beyond the model states, per GPU."""

    grads_held: float  # at the end of a forward
    grads_held_backward: float
    buckets: float  # during a backward
    buckets_forward: float
    zero3: float
    act_layers: float
    act_fixed: float
    backward: float
    loss: float
    step: float


def _check_context_parallel(cfg, n_gpus: int, seq_len: int, P_cp: int) -> None:
    if P_cp < 1 or n_gpus % P_cp or seq_len % P_cp:
        raise ValueError(f"context parallel {P_cp} must divide the GPUs ({n_gpus}) and the sequence ({seq_len})")
    if P_cp > 1 and not _is_retnet(cfg):
        raise ValueError("context parallelism is modeled for RetNet only (its state is what is passed)")


def memory_in_gib(memory: dict) -> dict:
    """Every byte count of `memory` in GiB, the per-phase peaks included (its counts are ints or floats)."""
    gib = {k: v / GiB for k, v in memory.items() if isinstance(v, (int, float))}
    gib["peaks"] = {phase: v / GiB for phase, v in memory["peaks"].items()}
    return gib


def _step_shape(
    cfg, n_gpus, seq_len, micro_batch, context_parallel, global_batch_tokens, grad_accum, n_params
) -> _StepShape:
    """The layout, checked; grad_accum defaults to what reaches global_batch_tokens."""
    _check_context_parallel(cfg, n_gpus, seq_len, context_parallel)
    dp = n_gpus // context_parallel
    if grad_accum is None:
        grad_accum = max(1, global_batch_tokens // (micro_batch * seq_len * dp))
    P = n_params if n_params is not None else param_counts(cfg)["total"]
    return _StepShape(n_gpus, context_parallel, seq_len, micro_batch, grad_accum, P)


def _working_bytes(
    cfg, shape: _StepShape, zero_stage: int, ds: DeepSpeedSettings, backend, checkpointing
) -> _WorkingBytes:
    tokens = shape.tokens
    return _WorkingBytes(
        grads_held=shape.n_params * grads_held_bytes_per_param(zero_stage, shape.n_gpus, shape.grad_accum),
        grads_held_backward=shape.n_params
        * grads_held_bytes_per_param(zero_stage, shape.n_gpus, shape.grad_accum, backward=True),
        buckets=bucket_bytes(zero_stage, ds),
        buckets_forward=bucket_bytes_in_forward(zero_stage, ds, shape.grad_accum),
        zero3=zero3_working_set_bytes(cfg, ds) if zero_stage == 3 else 0.0,
        act_layers=cfg.n_layers * tokens * activation_bytes_per_token_per_layer(cfg, backend, BF16, checkpointing),
        act_fixed=activation_fixed_bytes(cfg, tokens, shape.seq_local),
        backward=backward_working_bytes(cfg, tokens, backend, BF16, checkpointing),
        loss=loss_forward_transient_bytes(cfg, tokens),
        step=step_transient_bytes(zero_stage, shape.n_gpus, shape.n_params, ds.sub_group_size),
    )


def _phase_peaks(states: float, grads: float, w: _WorkingBytes) -> dict:
    held = states + w.zero3 + w.act_layers + w.act_fixed
    return {
        "forward": held + w.grads_held + w.buckets_forward + w.loss,
        "backward": held + w.grads_held_backward + w.buckets + w.backward,
        "optimizer_step": states + grads + w.step,
    }


def _memory(cfg, shape: _StepShape, zero_stage: int, ds: DeepSpeedSettings, backend, checkpointing) -> dict:
    """Per-GPU bytes by item; the peak is the largest of the forward, backward and optimizer-step peaks."""
    P = shape.n_params
    per = zero_bytes_per_param(zero_stage, shape.n_gpus)
    states = P * (per["params"] + per["master"] + per["optimizer"])
    w = _working_bytes(cfg, shape, zero_stage, ds, backend, checkpointing)
    peaks = _phase_peaks(states, P * per["grads"], w)
    phase = max(peaks, key=peaks.get)
    return {
        "params": P * per["params"],
        "grads": P * per["grads"],
        "master": P * per["master"],
        "optimizer": P * per["optimizer"],
        "grads_held_during_backward": w.grads_held_backward,
        "reduce_buckets": w.buckets,
        "zero3_gathered": w.zero3,
        "activations": w.act_layers + w.act_fixed,
        "backward_working": w.backward,
        "loss_transient": w.loss,
        "step_fp32_grads": w.step,
        # what stays allocated between steps (bench/train_throughput.py's resident_gib)
        "resident": states + (P * per["grads"] if zero_stage == 3 else 0.0),
        "peak": peaks[phase],
        "peak_phase": phase,
        "peaks": peaks,
    }


def _executed_flops_per_token(cfg, seq_len: int, checkpointing: str) -> tuple:
    """(model FLOPs, FLOPs executed with the recomputation activation checkpointing adds) per token.
    "full" runs every block's forward once more; "selective" (RetNet) its mixing region's
    (MultiScaleRetention.mix): the retention matmuls' forward (model FLOPs - six_n, a third of it)
    and the q, k, v projection GEMMs' forward, 2 FLOPs per weight (six_n counts 6: 2 forward, 4 backward)."""
    six_n, flops = _model_flops_per_token(json.dumps(cfg.to_dict(), sort_keys=True), seq_len)
    if checkpointing == "full":
        return flops, flops * 4 / 3
    if checkpointing == "selective" and _is_retnet(cfg):
        return flops, flops + (flops - six_n) / 3 + cfg.n_layers * 2 * qkv_proj_params(cfg)
    return flops, flops


def _compute(cfg, shape: _StepShape, checkpointing: str, hw: Hardware) -> dict:
    """Compute time per optimizer step, and per micro-batch split into forward and backward."""
    flops, executed = _executed_flops_per_token(cfg, shape.seq_len, checkpointing)
    rate = hw.peak_flops * hw.utilization
    t_micro = shape.tokens * executed / rate
    # forward = a third of the model FLOPs (backward = 2 forwards); the backward also runs what
    # checkpointing recomputes
    t_fwd = shape.tokens * flops / 3 / rate
    return {
        "flops_per_token": flops,
        "utilization": hw.utilization,
        "seconds": t_micro * shape.grad_accum,
        "forward_s_per_micro": t_fwd,
        "backward_s_per_micro": t_micro - t_fwd,
    }


def _comm_op(name: str, collective: str, nbytes: float, bandwidth: float, overlaps: str) -> dict:
    return {
        "name": name,
        "collective": collective,
        "bytes": nbytes,
        "seconds": nbytes / bandwidth if nbytes else 0.0,
        "overlaps": overlaps,
    }


def _step_comm_ops(
    cfg, shape: _StepShape, zero_stage: int, ds: DeepSpeedSettings, hw: Hardware, bandwidth: float, checkpointing: str
) -> list:
    """Every transfer of one optimizer step on one GPU: ZeRO's collectives, then the context-parallel state."""
    ops = []
    for name, kind, payload, times, hide in comm_ops(zero_stage, shape.n_params, shape.grad_accum, ds.overlap_comm):
        b = collective_bus_bytes(kind, payload, shape.n_gpus) * times
        ops.append(_comm_op(name, kind, b, bandwidth, hide))
    if shape.context_parallel > 1:
        P = shape.context_parallel
        cp_bandwidth = bus_bandwidth(P, hw)  # NVLink while the P ranks share a node
        # the collectives run over the P ranks of a sequence, inside each layer: nothing hides them
        for name, kind, payload, times in context_parallel_ops(cfg, shape.micro_batch, P, checkpointing):
            b = collective_bus_bytes(kind, payload, P) * times * shape.grad_accum
            ops.append(_comm_op(name, kind, b, cp_bandwidth, "none"))
    return ops


def _exposed_seconds(ops: list, grad_accum: int, t_fwd: float, t_bwd: float) -> float:
    """Communication time not hidden under compute. An op overlapping the forward or backward is
    spread over the micro-batches and hides under each one's pass; one overlapping the last backward
    hides under that pass alone; the rest is exposed."""
    exposed = 0.0
    per_micro = {"forward": 0.0, "backward": 0.0}
    for op in ops:
        if op["overlaps"] in per_micro:
            per_micro[op["overlaps"]] += op["seconds"] / grad_accum
        elif op["overlaps"] == "backward_last":
            exposed += max(0.0, op["seconds"] - t_bwd)
        else:
            exposed += op["seconds"]
    return exposed + grad_accum * (max(0.0, per_micro["forward"] - t_fwd) + max(0.0, per_micro["backward"] - t_bwd))


def _comm(
    cfg, shape: _StepShape, zero_stage: int, ds: DeepSpeedSettings, hw: Hardware, compute: dict, checkpointing: str
) -> dict:
    """Communication per GPU per optimizer step, and what of it the compute does not hide."""
    bw = bus_bandwidth(shape.n_gpus, hw)  # ZeRO's collectives span all ranks (data- x context-parallel)
    ops = _step_comm_ops(cfg, shape, zero_stage, ds, hw, bw, checkpointing)
    t_fwd, t_bwd = compute["forward_s_per_micro"], compute["backward_s_per_micro"]
    return {
        "ops": ops,
        "bytes": sum(op["bytes"] for op in ops),
        "seconds": sum(op["seconds"] for op in ops),
        "bus_bandwidth_gbyte_s": bw / 1e9,
        "exposed_seconds": _exposed_seconds(ops, shape.grad_accum, t_fwd, t_bwd),
    }


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
    shape = _step_shape(cfg, n_gpus, seq_len, micro_batch, context_parallel, global_batch_tokens, grad_accum, n_params)
    ds = replace(ds, overlap_comm=overlaps_comm(ds.overlap_comm, n_gpus))  # as the trainer's config
    memory = _memory(cfg, shape, zero_stage, ds, backend, checkpointing)
    compute = _compute(cfg, shape, checkpointing, hw)
    comm = _comm(cfg, shape, zero_stage, ds, hw, compute, checkpointing)
    step_s = compute["seconds"] + comm["exposed_seconds"]
    return {
        "model": cfg.arch,
        "params": shape.n_params,
        "gpus": n_gpus,
        "data_parallel": shape.data_parallel,
        "context_parallel": context_parallel,
        "zero_stage": zero_stage,
        "activation_checkpointing": checkpointing,
        "seq_len": seq_len,
        "micro_batch": micro_batch,
        "grad_accum": shape.grad_accum,
        "tokens_per_step": micro_batch * seq_len * shape.data_parallel * shape.grad_accum,
        "backend": backend,
        "memory": memory,
        "memory_gib": memory_in_gib(memory),
        "comm": comm,
        "compute": compute,
        "step_seconds": step_s,
        "step_seconds_no_overlap": compute["seconds"] + comm["seconds"],
        "tokens_per_s_per_gpu": shape.tokens * shape.grad_accum / step_s,
        "fits": memory["peak"] / GiB <= hw.memory_gib * 0.95,
        "deepspeed": asdict(ds),
        "hardware": asdict(hw),
    }
