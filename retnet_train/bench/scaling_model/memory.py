"""Bytes per GPU: parameter counts, model states under ZeRO, activations per token per layer."""

from __future__ import annotations

from ...components.config import CHECKPOINTING_MODES, checkpointing_mode
from .settings import BF16, FP32, DeepSpeedSettings


def _is_retnet(cfg) -> bool:
    return cfg.arch == "retnet"


def norm_params(cfg, dim: int) -> int:
    return 2 * dim if cfg.norm == "layernorm" else dim  # LayerNorm: weight + bias


def ffn_params(cfg) -> int:
    return (3 if cfg.ffn_type == "glu" else 2) * cfg.d_model * cfg.ffn_dim


def qkv_proj_params(cfg) -> int:
    """RetNet's stacked q, k and v projection (MultiScaleRetention.qkv_proj): d x (2 d + d_v), no bias."""
    return cfg.d_model * (2 * cfg.d_model + cfg.value_dim)


def param_counts(cfg) -> dict:
    """Parameters by place, from the layer structure (model/retnet.py, transformer.py, layers.py)."""
    d, V = cfg.d_model, cfg.vocab_size
    if _is_retnet(cfg):
        vd = cfg.value_dim
        # q, k, v; g, out; head norm
        mixer = qkv_proj_params(cfg) + 2 * d * vd + (vd if cfg.head_norm_affine else 0)
    else:
        mixer = 4 * d * d  # qkv, out
    layer = mixer + ffn_params(cfg) + 2 * norm_params(cfg, d)
    embedding = V * d
    lm_head = 0 if cfg.tie_embeddings else V * d
    final_norm = norm_params(cfg, d)
    total = embedding + lm_head + final_norm + cfg.n_layers * layer
    return {
        "embedding": embedding,
        "lm_head": lm_head,
        "final_norm": final_norm,
        "per_layer": layer,
        "layers": cfg.n_layers * layer,
        "total": total,
    }


def meta_param_count(cfg) -> int:
    """The real model's count, built on the meta device (no memory)."""
    import torch

    from ...model import build_model

    with torch.device("meta"):
        return build_model(cfg).num_params()


def zero_bytes_per_param(stage: int, n_gpus: int) -> dict:
    """Resident bytes per parameter on each GPU (ZeRO paper, K = 12 for mixed-precision Adam):
    bf16 weights 2, bf16 gradients 2, fp32 master 4, fp32 Adam m and v 8. Stage 1 shards the
    fp32 states, 2 also the gradients, 3 also the weights, over the n_gpus data-parallel ranks."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero stage {stage} is not one of 0, 1, 2, 3")
    n = n_gpus
    return {
        "params": BF16 / n if stage >= 3 else BF16,
        "grads": BF16 / n if stage >= 2 else BF16,
        "master": FP32 / n if stage >= 1 else FP32,
        "optimizer": 2 * FP32 / n if stage >= 1 else 2 * FP32,
    }


def step_transient_bytes(stage: int, n_gpus: int, n_params: int, sub_group_size: int = 1_000_000_000) -> float:
    """fp32 gradient copy that DeepSpeed makes for the optimizer step: the whole model in its bf16
    ZeRO-0 path (FP16_UnfusedOptimizer: grad.to(fp32) per param, freed after the step), the own
    partition in ZeRO 1/2 (single_partition_of_fp32_groups[i].grad), and in ZeRO-3 one sub-group of
    the own partition at a time (stage3.py _prepare_fp32_grad_for_sub_group; _create_fp16_sub_groups
    counts sub_group_size in partition elements, not in the model's)."""
    if stage == 0:
        return FP32 * n_params
    if stage == 3:
        return FP32 * min(n_params / n_gpus, sub_group_size)
    return FP32 * n_params / n_gpus


def grads_held_bytes_per_param(stage: int, n_gpus: int, grad_accum: int, backward: bool = False) -> float:
    """Gradient bytes alive with the activations: at the end of a forward, or (backward) at the start of
    a backward. ZeRO 0/1 keep full bf16 gradients between the micro-batches of a step (none before
    the first: they are set to None after each step). ZeRO-2 copies each backward's reduced partition
    into a new partition-sized buffer (stage_1_and_2.py copy_grads_in_partition), added after the
    backward to the partition kept from the earlier micro-batches (independent_gradient_partition_epilogue);
    none survives a step. ZeRO-3 allocates its partition once (stage3.py grad_partitions_flat_buffer)."""
    partition = BF16 / n_gpus
    if stage == 3:
        return partition
    if stage == 2:
        return (partition if grad_accum > 1 else 0.0) + (partition if backward else 0.0)
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


def bucket_bytes_in_forward(stage: int, ds: DeepSpeedSettings, grad_accum: int) -> float:
    """Of bucket_bytes, what a forward finds allocated. ZeRO 1/2 allocate their buckets at a backward's
    first gradient and free them once its reduction ends (stage_1_and_2.py _release_ipg_buffers),
    which ZeRO-1 runs only at the step's last micro-batch: an accumulating ZeRO-1 step keeps them
    through its later forwards. ZeRO-3 allocates its bucket once."""
    if stage == 2 or (stage == 1 and grad_accum == 1):
        return 0.0
    return bucket_bytes(stage, ds)


def zero3_working_set_bytes(cfg, ds: DeepSpeedSettings) -> float:
    """ZeRO-3 parameters gathered at once: the module being run (a layer, or the LM head) plus the
    prefetch window, at most max_live_parameters; plus one layer's full-size bf16 gradients before
    they are reduce-scattered."""
    pc = param_counts(cfg)
    unit = max(pc["per_layer"], pc["lm_head"], pc["embedding"])
    gathered = min(ds.max_live_parameters, unit + ds.prefetch_bucket_size)
    return BF16 * gathered + BF16 * pc["per_layer"]


def activation_elements_per_token_per_layer(cfg, backend: str = "fla") -> dict:
    """Elements saved for backward per token by one block (eager, no checkpointing), by origin:
    name -> (elements, "act" | "fp32"); "act" elements have the model's dtype (bf16 on GPU).

    Norms (pre-norm, two per block): LayerNorm saves its input and the next matmul its output
    (2 d each). RMSNorm (layers.py, computed in fp32) saves x.float() (fp32; the same tensor in an fp32
    model), the normalized y for the weight multiply and the output: 2 d + d fp32 each.
    RoPE/xPos rotation saves only the shared sin/cos tables (x * cos: cos needs no gradient).

    RetNet MSR ("qkv"): rotated q and k (2 d) and v (d_v), the retention op's inputs and all it keeps:
    either backend (fla's chunk kernel, the torch path's ChunkRetention) recomputes its scores and chunk
    states in backward; "selective" checkpointing recomputes these three as well. The normalization,
    per-head norm and gate are one region recomputed in backward (MultiScaleRetention.gated_norm): it
    keeps its inputs, the retention output o and g (2 d_v), and out_proj keeps the region's output
    (d_v). The row sums have no gradient.

    Transformer (SDPA flash): rotated q, k and the output o (3 d; o doubles as out_proj's input),
    the fused qkv output (3 d: v is a view into it and keeps it alive).

    FFN: mlp act input and output (2 f); glu act input, act output, gate output, product (4 f).
    """
    d, f = cfg.d_model, cfg.ffn_dim
    out = {"norms": (4 * d, "act"), "ffn": ((4 if cfg.ffn_type == "glu" else 2) * f, "act")}
    if cfg.norm == "rmsnorm":
        out["norms_fp32"] = (2 * d, "fp32")
    if _is_retnet(cfg):
        vd = cfg.value_dim
        out["qkv"] = (2 * d + vd, "act")
        out["gate"] = (3 * vd, "act")
        if backend not in ("fla", "torch"):
            raise ValueError(f"backend {backend!r} is not one of 'fla', 'torch'")
    else:
        out["attention"] = (3 * d + 3 * d, "act")
    return out


def activation_small_bytes_per_token_per_layer(cfg) -> float:
    """Per-row norm statistics (fp32: LayerNorm mean and rstd, RMSNorm rsqrt) of the two norms; RetNet's
    normalization factor per head (fp32, the gated-norm region's input; the group norm's statistics
    are recomputed there); the Transformer's attention logsumexp per head (fp32)."""
    per_row = 2 if cfg.norm == "layernorm" else 1
    stats = 2 * per_row * FP32
    if _is_retnet(cfg):
        return stats + (cfg.n_heads * FP32 if cfg.normalize_retention else 0)
    return stats + cfg.n_heads * FP32


CHECKPOINTING = CHECKPOINTING_MODES
# the part of activation_elements_per_token_per_layer that "selective" recomputes instead of keeping
SELECTIVE_RECOMPUTED = "qkv"


def activation_bytes_per_token_per_layer(
    cfg, backend: str = "fla", dtype_bytes: int = BF16, checkpointing="none"
) -> float:
    """Bytes kept per token per block until its backward. "full" checkpointing (torch.utils.checkpoint
    per block) keeps only the block's input. "selective" (RetNet: MultiScaleRetention.mix, the q, k, v
    projections and the retention core, recomputed) keeps what "none" keeps but the mixer inputs
    (rotated q, k and v): the region's input is the normed block input, which g_proj keeps anyway,
    and its output o is the gated-norm region's input either way. The Transformer has no selective
    region: "selective" keeps what "none" keeps."""
    mode = checkpointing_mode(checkpointing)
    if mode == "full":
        return cfg.d_model * dtype_bytes
    parts = activation_elements_per_token_per_layer(cfg, backend)
    if mode == "selective" and _is_retnet(cfg):
        del parts[SELECTIVE_RECOMPUTED]
    return sum(
        n * (FP32 if kind == "fp32" else dtype_bytes) for n, kind in parts.values()
    ) + activation_small_bytes_per_token_per_layer(cfg)


def activation_fixed_bytes(cfg, tokens: int, seq_len: int, dtype_bytes: int = BF16) -> float:
    """Saved outside the blocks: token ids (int64), the sin/cos tables (shared by all layers), the
    final norm's input, and what the chunked LM-head loss (model/loss.py) keeps for backward: the
    hidden-state gradient [tokens, d] and the head-weight gradient [V, d] in the model dtype."""
    d, V = cfg.d_model, cfg.vocab_size
    rot = cfg.key_head_dim if _is_retnet(cfg) else cfg.d_model // cfg.n_heads
    final_norm = tokens * d * (dtype_bytes if cfg.norm == "layernorm" else FP32 + dtype_bytes)
    return 8 * tokens + 2 * seq_len * rot * dtype_bytes + final_norm + tokens * d * dtype_bytes + V * d * dtype_bytes


def loss_forward_transient_bytes(cfg, tokens: int) -> float:
    """Peak extra memory inside the chunked loss's forward: the fp32 head-gradient accumulator
    [V, d] and ~3 fp32 logits-sized chunks (logits, softmax, the scaled gradient) of
    CHUNK_BYTES / (4 V) tokens each (never all tokens' logits)."""
    from ...model.loss import CHUNK_BYTES

    chunk_tokens = min(tokens, max(1, CHUNK_BYTES // (FP32 * cfg.vocab_size)))
    return FP32 * cfg.vocab_size * cfg.d_model + 3 * FP32 * cfg.vocab_size * chunk_tokens


def backward_working_bytes(
    cfg, tokens: int, backend: str = "fla", dtype_bytes: int = BF16, checkpointing="none"
) -> float:
    """Extra memory while one block runs its backward: its gradients and temporaries (taken as
    one block's activations again), what checkpointing recomputes for it (full: the whole block, one
    more; selective: the mixer inputs q, k, v), and fla's chunk states h and dh recomputed in fp32
    ([H, K, V] per chunk of C tokens, twice)."""
    layer = tokens * activation_bytes_per_token_per_layer(cfg, backend, dtype_bytes, checkpointing="none")
    kept = tokens * activation_bytes_per_token_per_layer(cfg, backend, dtype_bytes, checkpointing)
    extra = layer + (layer if checkpointing_mode(checkpointing) == "full" else layer - kept)
    if _is_retnet(cfg) and backend == "fla":
        extra += 2 * FP32 * tokens * cfg.n_heads * cfg.key_head_dim * cfg.value_head_dim / cfg.chunk_size
    return extra
