"""Per-GPU memory and communication of a training step under DeepSpeed ZeRO 0-3: an analytic model.

    python -m retnet_train.bench.scaling_model --preset 1.3b --gpus 64 --seq-len 8192 --micro-batch 1 \
        [--zero-stage N] [--activation-checkpointing [none|selective|full]] [--context-parallel P] [--json]
    python -m retnet_train.bench.scaling_model --markdown          # the tables of docs/scaling.md
    python -m retnet_train.bench.scaling_model --measure --preset tiny --seq-len 512   # CPU check

Everything is bytes, per GPU, for bf16 mixed precision with AdamW as DeepSpeed runs it here
(bf16 weights and gradients, fp32 master weights and moments). The arithmetic sits in small pure
functions (tested in tests/bench/test_scaling_model.py); docs/scaling.md explains each term and
where it was checked against a measurement.

Not modeled: allocator fragmentation and caching (measured peaks are `max_memory_allocated`, which
excludes them), CUDA/NCCL context (~0.5-1 GiB per process, outside torch's counters), torch.compile
(fuses elementwise ops and saves fewer tensors: -4.3 GiB on 1.3B at 8k, docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
from dataclasses import asdict, dataclass, replace
from typing import Optional

import yaml

from ..model.layers import CHECKPOINTING_MODES, checkpointing_mode

GiB = 2 ** 30
BF16, FP32 = 2, 4
ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
DEEPSPEED_YAML = os.path.join(ROOT, "configs", "deepspeed", "default.yaml")
GLOBAL_BATCH_TOKENS = 4194304  # configs/train/default.yaml (the paper's 4M-token batches)


# ----------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class DeepSpeedSettings:
    """The ZeRO knobs that cost memory. `trainer()` is what components/optim.py builds from
    configs/deepspeed/default.yaml; `library_defaults()` is what DeepSpeed picks when a config names
    only the stage (bench/train_throughput.py)."""

    reduce_bucket_size: int = 500_000_000  # elements
    allgather_bucket_size: int = 500_000_000
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    prefetch_bucket_size: int = 500_000_000  # ZeRO-3: stage3_prefetch_bucket_size
    max_live_parameters: int = 1_000_000_000  # ZeRO-3: stage3_max_live_parameters (DeepSpeed default)
    persistence_threshold: int = 100_000  # ZeRO-3: params below this many elements stay gathered
    sub_group_size: int = 1_000_000_000  # ZeRO-3: parameters per optimizer sub-step (DeepSpeed default)

    @classmethod
    def trainer(cls, path: str = DEEPSPEED_YAML) -> "DeepSpeedSettings":
        with open(path) as f:
            ds = yaml.safe_load(f)
        # components/optim.py: ZeRO-3 gets stage3_prefetch_bucket_size = allgather_bucket_size
        return cls(reduce_bucket_size=int(ds["reduce_bucket_size"]), allgather_bucket_size=int(ds["allgather_bucket_size"]),
                   overlap_comm=bool(ds["overlap_comm"]), contiguous_gradients=bool(ds["contiguous_gradients"]),
                   prefetch_bucket_size=int(ds["allgather_bucket_size"]))

    @classmethod
    def library_defaults(cls, zero_stage: int) -> "DeepSpeedSettings":
        return cls(overlap_comm=zero_stage == 3, prefetch_bucket_size=50_000_000)


@dataclass(frozen=True)
class Hardware:
    """Bandwidths are per GPU and per direction. Between nodes: one 400 Gb/s NIC per GPU (8 per node,
    as on DGX/HGX H100/H200); inside a node: NVLink 4 (450 GB/s per direction). `efficiency` is
    the fraction of line rate NCCL's bus bandwidth reaches on large messages."""

    gpus_per_node: int = 8
    ib_gbit_per_gpu: float = 400.0
    nvlink_gbyte_per_gpu: float = 450.0
    efficiency: float = 0.8
    peak_flops: float = 989e12  # H100/H200 dense bf16 (components/metrics.py PEAK_FLOPS)
    utilization: float = 0.25  # executed FLOPs / peak: RetNet 1.3B ZeRO-1 --compile measured 0.245 (docs/benchmarks.md)
    memory_gib: float = 79.2  # H100 80GB as torch reports it; H200: 139.8


def bus_bandwidth(n_gpus: int, hw: Hardware) -> float:
    """Bytes/s each GPU moves in a ring collective: NVLink inside one node, else its NIC."""
    if n_gpus <= hw.gpus_per_node:
        return hw.nvlink_gbyte_per_gpu * 1e9 * hw.efficiency
    return hw.ib_gbit_per_gpu / 8 * 1e9 * hw.efficiency


# ----------------------------------------------------------------------------------------------
# parameters


def _is_retnet(cfg) -> bool:
    return cfg.arch == "retnet"


def norm_params(cfg, dim: int) -> int:
    return 2 * dim if cfg.norm == "layernorm" else dim  # LayerNorm: weight + bias


def ffn_params(cfg) -> int:
    return (3 if cfg.ffn_type == "glu" else 2) * cfg.d_model * cfg.ffn_dim


def param_counts(cfg) -> dict:
    """Parameters by place, from the layer structure (model/retnet.py, transformer.py, layers.py)."""
    d, V = cfg.d_model, cfg.vocab_size
    if _is_retnet(cfg):
        vd = cfg.value_dim
        mixer = 2 * d * d + 3 * d * vd + (vd if cfg.head_norm_affine else 0)  # q, k; v, g, out; head norm
    else:
        mixer = 4 * d * d  # qkv, out
    layer = mixer + ffn_params(cfg) + 2 * norm_params(cfg, d)
    embedding = V * d
    lm_head = 0 if cfg.tie_embeddings else V * d
    final_norm = norm_params(cfg, d)
    total = embedding + lm_head + final_norm + cfg.n_layers * layer
    return {"embedding": embedding, "lm_head": lm_head, "final_norm": final_norm, "per_layer": layer,
            "layers": cfg.n_layers * layer, "total": total}


def meta_param_count(cfg) -> int:
    """The real model's count, built on the meta device (no memory)."""
    import torch

    from ..model import build_model

    with torch.device("meta"):
        return build_model(cfg).num_params()


# ----------------------------------------------------------------------------------------------
# model states under ZeRO


def zero_bytes_per_param(stage: int, n_gpus: int) -> dict:
    """Resident bytes per parameter on each GPU (ZeRO paper, K = 12 for mixed-precision Adam):
    bf16 weights 2, bf16 gradients 2, fp32 master 4, fp32 Adam m and v 8. Stage 1 shards the
    fp32 states, 2 also the gradients, 3 also the weights, over the n_gpus data-parallel ranks."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero stage {stage} is not one of 0, 1, 2, 3")
    n = n_gpus
    return {"params": BF16 / n if stage >= 3 else BF16,
            "grads": BF16 / n if stage >= 2 else BF16,
            "master": FP32 / n if stage >= 1 else FP32,
            "optimizer": 2 * FP32 / n if stage >= 1 else 2 * FP32}


def step_transient_bytes(stage: int, n_gpus: int, n_params: int, sub_group_size: int = 1_000_000_000) -> float:
    """fp32 gradient copy that DeepSpeed makes for the optimizer step: the whole model in its bf16
    ZeRO-0 path (FP16_UnfusedOptimizer: grad.to(fp32) per param, freed after the step), the own
    partition in ZeRO 1/2 (single_partition_of_fp32_groups[i].grad), and in ZeRO-3 the own share
    of one sub-group at a time (sub_group_size parameters, stage3.py _prepare_fp32_grad_for_sub_group)."""
    if stage == 0:
        return FP32 * n_params
    if stage == 3:
        return FP32 * min(n_params, sub_group_size) / n_gpus
    return FP32 * n_params / n_gpus


def grads_held_bytes_per_param(stage: int, n_gpus: int, grad_accum: int) -> float:
    """Gradient bytes alive while activations are: ZeRO 0/1 keep full bf16 gradients between
    micro-batches (none at the first backward's start when grad_accum == 1: they are set to None
    after each step); ZeRO 2/3 keep only their partition, allocated once and kept."""
    if stage >= 2:
        return BF16 / n_gpus
    return BF16 if grad_accum > 1 else 0.0


def bucket_bytes(stage: int, ds: DeepSpeedSettings) -> float:
    """Gradient reduction buffers allocated for the backward pass (bf16): ZeRO 1/2 with
    contiguous_gradients hold reduce_bucket_size elements, twice with overlap_comm
    (stage_1_and_2.py setup_buckets); ZeRO-3 one bucket (stage3.py)."""
    if stage == 0:
        return 0.0
    if stage == 3:
        return BF16 * ds.reduce_bucket_size
    if not ds.contiguous_gradients:
        return 0.0
    return BF16 * ds.reduce_bucket_size * (2 if ds.overlap_comm else 1)


def zero3_working_set_bytes(cfg, ds: DeepSpeedSettings) -> float:
    """ZeRO-3 parameters gathered at once: the module being run (a layer, or the LM head) plus the
    prefetch window, at most max_live_parameters; plus one layer's full-size bf16 gradients before
    they are reduce-scattered."""
    pc = param_counts(cfg)
    unit = max(pc["per_layer"], pc["lm_head"], pc["embedding"])
    gathered = min(ds.max_live_parameters, unit + ds.prefetch_bucket_size)
    return BF16 * gathered + BF16 * pc["per_layer"]


# ----------------------------------------------------------------------------------------------
# activations


def activation_elements_per_token_per_layer(cfg, backend: str = "fla") -> dict:
    """Elements saved for backward per token by one block (eager, no checkpointing), by origin:
    name -> (elements, "act" | "fp32"); "act" elements have the model's dtype (bf16 on GPU).

    Norms (pre-norm, two per block): LayerNorm saves its input and the next matmul its output
    (2 d each). RMSNorm (layers.py, computed in fp32) saves x.float() (fp32; the same tensor in an fp32
    model), the normalized y for the weight multiply and the output: 2 d + d fp32 each.
    RoPE/xPos rotation saves only the shared sin/cos tables (x * cos: cos needs no gradient).

    RetNet MSR: rotated q and k (2 d) and v (d_v) as the retention op's inputs; the group norm's input
    (d_v; fp32 for rmsnorm); g (silu's input), silu(g) and the normed output (the gate product's
    two inputs) and the product (out_proj's input): 4 d_v. The normalization factor has no gradient
    (row sums detached).
    backend "fla" (GPU): fla's chunk kernel saves only q, k, v and recomputes its chunk states in
    backward. backend "torch" (the plain path, CPU) saves more: decayed q and k (2 d), the C x C
    intra-chunk scores (H C), the per-chunk [K, V] states (H K V / C) and a second copy of v (d_v:
    both chunk matmuls copy the strided v view). The row sums come from these intermediates without
    gradient.

    Transformer (SDPA flash): rotated q, k and the output o (3 d; o doubles as out_proj's input),
    the fused qkv output (3 d: v is a view into it and keeps it alive).

    FFN: mlp act input and output (2 f); glu act input, act output, gate output, product (4 f).
    """
    d, f = cfg.d_model, cfg.ffn_dim
    out = {"norms": (4 * d, "act"),
           "ffn": ((4 if cfg.ffn_type == "glu" else 2) * f, "act")}
    if cfg.norm == "rmsnorm":
        out["norms_fp32"] = (2 * d, "fp32")
    if _is_retnet(cfg):
        vd, H, K, C = cfg.value_dim, cfg.n_heads, cfg.key_head_dim, cfg.chunk_size
        out["qkv"] = (2 * d + vd, "act")
        out["group_norm_input"] = (vd, "act" if cfg.norm == "layernorm" else "fp32")
        out["gate"] = (4 * vd + (vd if cfg.head_norm_affine else 0), "act")
        if backend == "torch":
            out["torch_chunkwise"] = (2 * d + vd + H * C + H * K * cfg.value_head_dim / C, "act")
        elif backend != "fla":
            raise ValueError(f"backend {backend!r} is not one of 'fla', 'torch'")
    else:
        out["attention"] = (3 * d + 3 * d, "act")
    return out


def activation_small_bytes_per_token_per_layer(cfg, dtype_bytes: int = BF16, selective: bool = False) -> float:
    """Per-row norm statistics (fp32: LayerNorm mean and rstd, RMSNorm rsqrt) of the two norms and
    the per-head group norm, the normalization factor per head; the Transformer's attention
    logsumexp per head (fp32). Selective checkpointing drops the group norm's and the factor's."""
    per_row = 2 if cfg.norm == "layernorm" else 1
    stats = 2 * per_row * FP32
    if _is_retnet(cfg):
        if selective:
            return stats
        return stats + per_row * cfg.n_heads * FP32 + (cfg.n_heads * dtype_bytes if cfg.normalize_retention else 0)
    return stats + cfg.n_heads * FP32


CHECKPOINTING = CHECKPOINTING_MODES
CORE_TERMS = ("torch_chunkwise", "group_norm_input")  # what RetNet's retention_core keeps, recomputed by "selective"


def activation_bytes_per_token_per_layer(cfg, backend: str = "fla", dtype_bytes: int = BF16,
                                         checkpointing="none") -> float:
    """Bytes kept per token per block until its backward. "full" checkpointing (torch.utils.checkpoint
    per block) keeps only the block's input; "selective" (RetNet) recomputes the retention core
    (retention, normalization, group norm) from q, k, v, which are kept anyway: it drops the core's
    internals (torch path) and the group norm's input. The Transformer has no selective core."""
    mode = checkpointing_mode(checkpointing)
    if mode == "full":
        return cfg.d_model * dtype_bytes
    selective = mode == "selective" and _is_retnet(cfg)
    parts = {k: v for k, v in activation_elements_per_token_per_layer(cfg, backend).items()
             if not (selective and k in CORE_TERMS)}
    return sum(n * (FP32 if kind == "fp32" else dtype_bytes) for n, kind in parts.values()) \
        + activation_small_bytes_per_token_per_layer(cfg, dtype_bytes, selective)


def activation_fixed_bytes(cfg, tokens: int, seq_len: int, dtype_bytes: int = BF16) -> float:
    """Saved outside the blocks: token ids (int64), the sin/cos tables (shared by all layers), the
    final norm's input, and what the chunked LM-head loss (model/loss.py) keeps for backward: the
    hidden-state gradient [tokens, d] and the head-weight gradient [V, d] in the model dtype."""
    d, V = cfg.d_model, cfg.vocab_size
    rot = cfg.key_head_dim if _is_retnet(cfg) else cfg.d_model // cfg.n_heads
    final_norm = tokens * d * (dtype_bytes if cfg.norm == "layernorm" else FP32 + dtype_bytes)
    return (8 * tokens + 2 * seq_len * rot * dtype_bytes + final_norm
            + tokens * d * dtype_bytes + V * d * dtype_bytes)


def loss_forward_transient_bytes(cfg, tokens: int) -> float:
    """Peak extra memory inside the chunked loss's forward: the fp32 head-gradient accumulator
    [V, d] and ~3 fp32 logits-sized chunks (logits, softmax, the scaled gradient) of
    CHUNK_BYTES / (4 V) tokens each (never all tokens' logits)."""
    from ..model.loss import CHUNK_BYTES

    chunk_tokens = min(tokens, max(1, CHUNK_BYTES // (FP32 * cfg.vocab_size)))
    return FP32 * cfg.vocab_size * cfg.d_model + 3 * FP32 * cfg.vocab_size * chunk_tokens


def backward_working_bytes(cfg, tokens: int, backend: str = "fla", dtype_bytes: int = BF16,
                           checkpointing="none") -> float:
    """Extra memory while one block runs its backward: its gradients and temporaries (taken as
    one block's activations again), the block recomputed under checkpointing (one more), and fla's
    chunk states h and dh recomputed in fp32 ([H, K, V] per chunk of C tokens, twice)."""
    layer = tokens * activation_bytes_per_token_per_layer(cfg, backend, dtype_bytes, checkpointing=False)
    extra = layer * (2 if checkpointing_mode(checkpointing) == "full" else 1)
    if _is_retnet(cfg) and backend == "fla":
        extra += 2 * FP32 * tokens * cfg.n_heads * cfg.key_head_dim * cfg.value_head_dim / cfg.chunk_size
    return extra


# ----------------------------------------------------------------------------------------------
# communication


def collective_bus_bytes(kind: str, payload: float, n_gpus: int) -> float:
    """Bytes each GPU sends (= receives) in a ring collective over n_gpus: all-reduce 2 (n-1)/n S,
    reduce-scatter and all-gather (n-1)/n S; p2p S."""
    if kind == "p2p":
        return payload
    if n_gpus <= 1:
        return 0.0
    share = (n_gpus - 1) / n_gpus
    if kind == "all_reduce":
        return 2 * share * payload
    if kind in ("reduce_scatter", "all_gather"):
        return share * payload
    raise ValueError(f"collective {kind!r}")


def comm_ops(stage: int, n_params: int, grad_accum: int) -> list:
    """Collectives of one optimizer step over the data-parallel group (bf16 payloads):
    (name, collective, payload bytes, times per step, phase it can hide behind).

    ZeRO-0: gradient all-reduce after the last backward (DeepSpeed's engine, not overlapped).
    ZeRO-1: gradients reduce-scattered once per step (during the last micro-batch's backward with
      overlap_comm), updated weights all-gathered after the step: the same bytes as an all-reduce.
    ZeRO-2: gradients reduce-scattered every micro-batch (only the partition is kept), weights
      all-gathered after the step.
    ZeRO-3: every micro-batch gathers the weights for the forward and again for the backward and
      reduce-scatters the gradients: 3x the weights per micro-batch, no gather after the step.
    """
    P2 = BF16 * n_params
    if stage == 0:
        return [("grad all-reduce", "all_reduce", P2, 1, "none")]
    if stage == 1:
        return [("grad reduce-scatter", "reduce_scatter", P2, 1, "backward_last"),
                ("param all-gather", "all_gather", P2, 1, "none")]
    if stage == 2:
        return [("grad reduce-scatter", "reduce_scatter", P2, grad_accum, "backward"),
                ("param all-gather", "all_gather", P2, 1, "none")]
    if stage == 3:
        return [("param all-gather (forward)", "all_gather", P2, grad_accum, "forward"),
                ("param all-gather (backward)", "all_gather", P2, grad_accum, "backward"),
                ("grad reduce-scatter", "reduce_scatter", P2, grad_accum, "backward")]
    raise ValueError(f"zero stage {stage} is not one of 0, 1, 2, 3")


def context_parallel_state_bytes(cfg, micro_batch: int) -> float:
    """The recurrent state one rank hands to the next per layer: [B, H, K, V (+1 row-sum column)]
    fp32. Forward sends it on, backward sends its gradient back: 2 per layer per micro-batch."""
    extra = 1 if cfg.normalize_retention else 0
    return FP32 * micro_batch * cfg.n_heads * cfg.key_head_dim * (cfg.value_head_dim + extra)


# ----------------------------------------------------------------------------------------------
# the estimate


@functools.lru_cache(maxsize=None)
def _model_flops_per_token(cfg_json: str, seq_len: int) -> tuple:
    """model/flops.py's counts (6N; 6N plus the retention/attention matmuls), cached per config."""
    from ..model import model_config_from_dict
    from ..model.flops import flops_per_token

    f = flops_per_token(model_config_from_dict(json.loads(cfg_json)), seq_len)
    return f["six_n"], f["model"]


def estimate(cfg, n_gpus: int, seq_len: int = 8192, micro_batch: int = 1, zero_stage: int = 1,
             checkpointing="none", context_parallel: int = 1, ds: Optional[DeepSpeedSettings] = None,
             hw: Hardware = Hardware(), global_batch_tokens: int = GLOBAL_BATCH_TOKENS,
             grad_accum: Optional[int] = None, backend: str = "fla", n_params: Optional[int] = None) -> dict:
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
        "params": P * per["params"], "grads": P * per["grads"], "master": P * per["master"],
        "optimizer": P * per["optimizer"], "grads_held_during_backward": grads_held,
        "reduce_buckets": buckets, "zero3_gathered": zero3,
        "activations": act_layers + act_fixed, "backward_working": bwd_work, "loss_transient": loss_tmp,
        "step_fp32_grads": step_tmp,
        # what stays allocated between steps (bench/train_throughput.py's resident_gib)
        "resident": states + (P * per["grads"] if zero_stage >= 2 else 0.0),
        "peak": peaks[phase], "peak_phase": phase, "peaks": peaks,
    }

    # communication and compute, per GPU per optimizer step
    bw = bus_bandwidth(n_gpus, hw)  # ZeRO's collectives span all ranks (data- x context-parallel)
    ops = []
    for name, kind, payload, times, hide in comm_ops(zero_stage, P, grad_accum):
        b = collective_bus_bytes(kind, payload, n_gpus) * times
        ops.append({"name": name, "collective": kind, "bytes": b, "seconds": b / bw if b else 0.0, "overlaps": hide})
    if P_cp > 1:
        b = 2 * cfg.n_layers * context_parallel_state_bytes(cfg, micro_batch) * grad_accum
        ops.append({"name": "context-parallel state (p2p)", "collective": "p2p", "bytes": b,
                    "seconds": b / bus_bandwidth(P_cp, hw), "overlaps": "none"})
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
    comm = {"ops": ops, "bytes": sum(op["bytes"] for op in ops), "seconds": comm_s,
            "bus_bandwidth_gbyte_s": bw / 1e9, "exposed_seconds": exposed}
    step_s = compute + exposed
    return {
        "model": cfg.arch, "params": P, "gpus": n_gpus, "data_parallel": dp, "context_parallel": P_cp,
        "zero_stage": zero_stage, "activation_checkpointing": checkpointing, "seq_len": seq_len,
        "micro_batch": micro_batch, "grad_accum": grad_accum, "tokens_per_step": micro_batch * seq_len * dp * grad_accum,
        "backend": backend, "memory": memory, "memory_gib": {k: v / GiB for k, v in memory.items() if isinstance(v, float)},
        "comm": comm,
        "compute": {"flops_per_token": flops, "utilization": hw.utilization, "seconds": compute,
                    "forward_s_per_micro": t_fwd, "backward_s_per_micro": t_bwd},
        "step_seconds": step_s, "step_seconds_no_overlap": compute + comm_s,
        "tokens_per_s_per_gpu": micro_batch * seq_len // P_cp * grad_accum / step_s,
        "fits": memory["peak"] / GiB <= hw.memory_gib * 0.95,
        "deepspeed": asdict(ds), "hardware": asdict(hw),
    }


# ----------------------------------------------------------------------------------------------
# measuring saved activations on CPU (the check of activation_bytes_per_token_per_layer)


def measure_saved_activation_bytes(cfg, micro_batch: int, seq_len: int, checkpointing="none",
                                   seed: int = 0) -> int:
    """Bytes of the distinct tensors autograd saves during one training forward (chunked loss),
    counted once per storage, parameters excluded: torch.autograd.graph.saved_tensors_hooks."""
    import torch

    from ..model import build_model

    torch.manual_seed(seed)
    model = build_model(cfg)
    model.train()
    model.set_activation_checkpointing(checkpointing_mode(checkpointing))
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in param_storages:
            seen.setdefault(s.data_ptr(), s.nbytes())
        return t

    ids = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, labels=ids, return_logits=False)
    out.loss.backward()  # the graph was complete
    return sum(seen.values())


def measured_bytes_per_token_per_layer(cfg, micro_batch: int, seq_len: int, checkpointing="none") -> float:
    """Per-block saved bytes per token: the difference between n_layers and 2 n_layers (the parts
    outside the blocks cancel)."""
    a = measure_saved_activation_bytes(cfg, micro_batch, seq_len, checkpointing)
    b = measure_saved_activation_bytes(replace(cfg, n_layers=2 * cfg.n_layers), micro_batch, seq_len, checkpointing)
    return (b - a) / (cfg.n_layers * micro_batch * seq_len)


# ----------------------------------------------------------------------------------------------
# CLI


def load_preset(name: str, **overrides):
    from .train_throughput import load_preset as _load

    return _load(name, **overrides)


def _fmt_gib(x: float) -> str:
    return f"{x / GiB:.1f}"


def summary_lines(r: dict) -> list:
    m, c = r["memory"], r["comm"]
    ac = r["activation_checkpointing"]
    lines = [f"{r['model']} {r['params'] / 1e9:.2f}B params | {r['gpus']} GPUs (dp {r['data_parallel']}, cp {r['context_parallel']}) | "
             f"ZeRO-{r['zero_stage']} | seq {r['seq_len']} mb {r['micro_batch']} accum {r['grad_accum']} | "
             f"activation checkpointing {ac} | {r['tokens_per_step']:,} tokens/step",
             "memory per GPU (GiB):"]
    for k in ("params", "grads", "master", "optimizer", "grads_held_during_backward", "reduce_buckets",
              "zero3_gathered", "activations", "backward_working", "loss_transient", "step_fp32_grads"):
        lines.append(f"  {k:28s} {_fmt_gib(m[k]):>8s}")
    lines.append(f"  {'PEAK (' + m['peak_phase'] + ')':28s} {_fmt_gib(m['peak']):>8s}   "
                 + ", ".join(f"{k} {_fmt_gib(v)}" for k, v in m["peaks"].items()))
    lines.append(f"communication per GPU per step (bus bandwidth {c['bus_bandwidth_gbyte_s']:.0f} GB/s):")
    for op in c["ops"]:
        lines.append(f"  {op['name']:30s} {op['bytes'] / 1e9:9.2f} GB {op['seconds']:8.3f} s  (hides behind: {op['overlaps']})")
    lines.append(f"  total {c['bytes'] / 1e9:.2f} GB, {c['seconds']:.3f} s; exposed after overlap {c['exposed_seconds']:.3f} s")
    lines.append(f"compute {r['compute']['seconds']:.3f} s/step at {r['compute']['utilization']:.0%} of peak; "
                 f"step {r['step_seconds']:.3f} s (no overlap {r['step_seconds_no_overlap']:.3f} s), "
                 f"{r['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU; fits in {r['hardware']['memory_gib']} GiB: {r['fits']}")
    return lines


SIZES = ("1.3b", "2.7b", "6.7b", "13b")
GPU_COUNTS = (64, 128, 256, 512)


def markdown_tables(seq_len: int = 8192, micro_batch: int = 1, hw: Hardware = Hardware()) -> str:
    """The tables of docs/scaling.md."""
    out = []
    for arch in ("retnet", "transformer"):
        out.append(f"### Peak memory per GPU, GiB ({arch}, seq {seq_len}, micro-batch {micro_batch}, 4M-token batch)\n")
        modes = ("none", "selective", "full") if arch == "retnet" else ("none", "full")
        out.append("Cells: ZeRO-0 / 1 / 2 / 3 for each activation-checkpointing mode (`train.activation_checkpointing`). "
                   "Accumulation steps = 512 / GPUs.\n")
        out.append("| size | params | GPUs | " + " | ".join(f"{m}: Z0 / Z1 / Z2 / Z3" for m in modes)
                   + " | activations " + " / ".join(modes) + " |")
        out.append("|---|---|---|" + "---|" * (len(modes) + 1))
        for size in SIZES:
            cfg = load_preset(size if arch == "retnet" else f"transformer_{size}")
            for n in GPU_COUNTS:
                cells, acts = [], []
                for ac in modes:
                    rs = [estimate(cfg, n, seq_len, micro_batch, z, ac, hw=hw) for z in (0, 1, 2, 3)]
                    cells.append(" / ".join(_fmt_gib(r["memory"]["peak"]) for r in rs))
                    acts.append(_fmt_gib(rs[0]["memory"]["activations"]))
                out.append(f"| {size} | {rs[0]['params'] / 1e9:.2f}B | {n} | " + " | ".join(cells) + f" | {' / '.join(acts)} |")
        out.append("")
    out.append(f"### Communication per GPU per optimizer step (RetNet, seq {seq_len}, micro-batch {micro_batch}, 4M tokens)\n")
    out.append(f"GB sent per GPU / seconds at {hw.ib_gbit_per_gpu:.0f} Gb/s x {hw.efficiency} per GPU; compute at "
               f"{hw.utilization:.0%} of {hw.peak_flops / 1e12:.0f} TFLOP/s, no activation checkpointing "
               "(AC adds 1/3 to compute, nothing to communication).\n")
    out.append("| size | GPUs | accum | compute s | Z0/Z1 GB, s | Z2 GB, s | Z3 GB, s | exposed comm s Z0 / Z1 / Z2 / Z3 "
               "| Z3 comm / compute |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for size in SIZES:
        cfg = load_preset(size)
        for n in GPU_COUNTS:
            rs = [estimate(cfg, n, seq_len, micro_batch, z, False, hw=hw) for z in (0, 1, 2, 3)]
            def gs(r):
                return f"{r['comm']['bytes'] / 1e9:.1f}, {r['comm']['seconds']:.2f}"
            out.append(f"| {size} | {n} | {rs[0]['grad_accum']} | {rs[0]['compute']['seconds']:.2f} | {gs(rs[1])} | {gs(rs[2])} | "
                       f"{gs(rs[3])} | " + " / ".join(f"{r['comm']['exposed_seconds']:.2f}" for r in rs)
                       + f" | {rs[3]['comm']['seconds'] / rs[3]['compute']['seconds']:.2f} |")
    return "\n".join(out)


# The 1- and 2-GPU runs the model is checked against (docs/scaling.md, "Checked against measurements").
# measured: peak GiB from docs/benchmarks.md (bench/train_throughput.py: DeepSpeed's own bucket
# defaults, micro-batch 1, no accumulation); None where the run is still to be done.
MEASURED_RUNS = (
    dict(run="1.3B RetNet, ZeRO-0, 1x H100, eager", preset="1.3b", gpus=1, zero=0, ac=False, mem=79.2,
         measured=36.68, note="docs/benchmarks.md run 1"),
    dict(run="1.3B RetNet, ZeRO-0, 1x H100, --compile", preset="1.3b", gpus=1, zero=0, ac=False, mem=79.2,
         measured=32.36, note="compile saves fewer tensors (not modeled)"),
    dict(run="1.3B RetNet, ZeRO-1, 1x H100, --compile", preset="1.3b", gpus=1, zero=1, ac=False, mem=79.2,
         measured=33.04, note="runs 4 and 5"),
    dict(run="1.3B Transformer, ZeRO-0, 1x H100, eager", preset="transformer_1.3b", gpus=1, zero=0, ac=False, mem=79.2,
         measured=32.26, note="run 1"),
    dict(run="1.3B RetNet, ZeRO-2, 2x H200", preset="1.3b", gpus=2, zero=2, ac=False, mem=139.8, measured=None, note=""),
    dict(run="6.7B RetNet, ZeRO-3, 2x H200, AC", preset="6.7b", gpus=2, zero=3, ac=True, mem=139.8, measured=None,
         note="experiment retnet_6.7b_8k"),
    dict(run="6.7B RetNet, ZeRO-3, 2x H200, no AC", preset="6.7b", gpus=2, zero=3, ac=False, mem=139.8, measured=None, note=""),
)


def measured_run_predictions(hw: Hardware = Hardware()) -> list:
    """The model's numbers for MEASURED_RUNS, as the bench runs them (DeepSpeed's bucket defaults,
    grad_accum 1) and, for the multi-GPU ones, as the trainer runs them (configs/deepspeed/default.yaml,
    4M-token batches)."""
    rows = []
    for run in MEASURED_RUNS:
        cfg = load_preset(run["preset"])
        h = replace(hw, memory_gib=run["mem"])
        bench = estimate(cfg, run["gpus"], 8192, 1, run["zero"], run["ac"], ds=DeepSpeedSettings.library_defaults(run["zero"]),
                         hw=h, grad_accum=1)
        trainer = estimate(cfg, run["gpus"], 8192, 1, run["zero"], run["ac"], ds=DeepSpeedSettings.trainer(), hw=h) \
            if run["gpus"] > 1 else None
        rows.append({**run, "bench": bench, "trainer": trainer})
    return rows


def measured_runs_markdown(hw: Hardware = Hardware()) -> str:
    out = ["| run | measured peak GiB | predicted peak GiB (phase) | resident | peak - resident | comm per micro-batch "
           "| s per micro-batch | tokens/s/GPU | note |",
           "|---|---|---|---|---|---|---|---|---|"]
    for row in measured_run_predictions(hw):
        for label, r in (("bench", row["bench"]), ("trainer", row["trainer"])):
            if r is None:
                continue
            m, c = r["memory"], r["comm"]
            meas = f"{row['measured']:.2f}" if (row["measured"] is not None and label == "bench") else "_todo_"
            a = r["grad_accum"]
            comm = f"{c['bytes'] / a / 1e9:.1f} GB, {c['seconds'] / a * 1e3:.0f} ms" if c["bytes"] else "-"
            out.append(f"| {row['run']} ({label}{', accum ' + str(a) if label == 'trainer' else ''}) | {meas} | "
                       f"{m['peak'] / GiB:.1f} ({m['peak_phase']}) | {m['resident'] / GiB:.1f} | "
                       f"{(m['peak'] - m['resident']) / GiB:.1f} | {comm} | {r['step_seconds'] / a:.3f} | "
                       f"{r['tokens_per_s_per_gpu']:,.0f} | {row['note']} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="1.3b", help="configs/model/<preset>.yaml (transformer_* for the baseline)")
    p.add_argument("--gpus", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=None, help="default: all four")
    p.add_argument("--activation-checkpointing", nargs="?", const="full", default="none", choices=CHECKPOINTING,
                   help="none | selective (RetNet's retention core) | full (every block); bare flag: full")
    p.add_argument("--context-parallel", type=int, default=1, metavar="P")
    p.add_argument("--global-batch-tokens", type=int, default=GLOBAL_BATCH_TOKENS)
    p.add_argument("--grad-accum", type=int, default=None, help="default: global batch / (micro-batch * seq * data-parallel)")
    p.add_argument("--backend", choices=["fla", "torch"], default="fla", help="retention path whose saved tensors to count")
    p.add_argument("--deepspeed-defaults", action="store_true",
                   help="DeepSpeed's own bucket defaults (what bench/train_throughput.py gets) instead of configs/deepspeed/default.yaml")
    p.add_argument("--gpu-memory-gib", type=float, default=Hardware.memory_gib)
    p.add_argument("--ib-gbit", type=float, default=Hardware.ib_gbit_per_gpu, help="inter-node Gb/s per GPU")
    p.add_argument("--nvlink-gbyte", type=float, default=Hardware.nvlink_gbyte_per_gpu, help="intra-node GB/s per GPU")
    p.add_argument("--efficiency", type=float, default=Hardware.efficiency, help="bus bandwidth / line rate")
    p.add_argument("--utilization", type=float, default=Hardware.utilization, help="executed FLOPs / peak")
    p.add_argument("--json", action="store_true")
    p.add_argument("--markdown", action="store_true", help="print the tables of docs/scaling.md")
    p.add_argument("--measured-runs", action="store_true", help="predictions for the 1- and 2-GPU runs of docs/scaling.md")
    p.add_argument("--measure", action="store_true",
                   help="CPU: compare the per-layer activation formula (torch backend, fp32) with saved tensors")
    args = p.parse_args(argv)
    hw = Hardware(memory_gib=args.gpu_memory_gib, ib_gbit_per_gpu=args.ib_gbit, nvlink_gbyte_per_gpu=args.nvlink_gbyte,
                  efficiency=args.efficiency, utilization=args.utilization)
    if args.markdown:
        print(markdown_tables(args.seq_len, args.micro_batch, hw))
        return
    if args.measured_runs:
        print(measured_runs_markdown(hw))
        return
    cfg = load_preset(args.preset)
    if args.measure:
        if _is_retnet(cfg):
            cfg = replace(cfg, retention_backend="torch")
        measured = measured_bytes_per_token_per_layer(cfg, args.micro_batch, args.seq_len, args.activation_checkpointing)
        predicted = activation_bytes_per_token_per_layer(cfg, "torch", FP32, args.activation_checkpointing)
        print(json.dumps({"preset": args.preset, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
                          "checkpointing": args.activation_checkpointing, "measured_bytes_per_token_per_layer": measured,
                          "predicted": predicted, "relative_error": predicted / measured - 1}))
        return
    stages = [args.zero_stage] if args.zero_stage is not None else [0, 1, 2, 3]
    for z in stages:
        ds = DeepSpeedSettings.library_defaults(z) if args.deepspeed_defaults else DeepSpeedSettings.trainer()
        r = estimate(cfg, args.gpus, args.seq_len, args.micro_batch, z, args.activation_checkpointing, args.context_parallel,
                     ds, hw, args.global_batch_tokens, args.grad_accum, args.backend)
        if args.json:
            print(json.dumps(r))
        else:
            print("\n".join(summary_lines(r)) + "\n")


if __name__ == "__main__":
    main()
