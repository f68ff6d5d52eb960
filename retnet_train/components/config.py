"""Typed trainer config. Hydra composes the YAML groups onto this schema, so a misspelled key or
a wrong type fails at start naming the key; below the entry point only plain values flow."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class DataConfig:
    # Shard directories (or Megatron .bin/.idx prefixes) and their mixing weights, gpt-neox style:
    # data.paths=[/data/web,/data/code] data.weights=[0.7,0.3]; no weights: equal.
    paths: List[str] = field(default_factory=list)
    weights: List[float] = field(default_factory=list)
    tokenizer: Optional[str] = None  # sentencepiece .model whose sha256 the manifests must carry
    seq_len: int = 2048
    seed: int = 1234
    verify_checksums: bool = False
    # a resume onto other data.* than the checkpoint's: refuse | switch (a new stream from the checkpoint's
    # step, each unchanged source continuing where it stopped: retnet_train/data/stream_switch.py)
    on_change: str = "refuse"


@dataclass
class OptimConfig:
    lr: float = 6e-4
    min_lr_ratio: float = 0.0  # final lr = lr * min_lr_ratio
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    weight_decay: float = 0.05
    no_decay_embeddings: bool = True  # norms and biases never decay
    warmup_steps: int = 375
    decay: str = "linear"  # linear | cosine | sqrt (1 - sqrt) | constant: its shape down to lr * min_lr_ratio
    decay_fraction: Optional[float] = None  # null | (0, 1]: decay over the last fraction of train.max_steps (WSD)
    grad_clip: float = 1.0


DECAYS = ("linear", "cosine", "sqrt", "constant")
PRECISIONS = ("bf16", "bf16-mixed", "fp16", "fp32")
FP32_WEIGHTS = ("fp32", "bf16-mixed")  # precisions whose weights, gradients and checkpoints are fp32


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1
    # bf16: bf16 weights and activations, fp32 master weights in the optimizer (DeepSpeed's bf16) |
    # bf16-mixed: fp32 weights, forward and backward under torch.autocast(bf16) (DeepSpeed's torch_autocast) |
    # fp16 (dynamic loss scaling) | fp32
    precision: str = "bf16"
    # dtype of the gradients summed over micro-batches (and reduced over ranks): null = the precision's
    # (DeepSpeed's default: bf16 gradients under bf16) | fp32 (bf16 with ZeRO 1: DeepSpeed's BF16_Optimizer,
    # which adds each micro-batch's bf16 gradients into fp32 ones, as a torch.autocast loop keeps them)
    grad_accum_dtype: Optional[str] = None
    offload_optimizer: bool = False
    offload_param: bool = False  # ZeRO-3 only
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    overlap_comm: bool = True
    contiguous_gradients: bool = True


@dataclass
class TrainSection:
    micro_batch_size: int = 1
    global_batch_tokens: int = 4 * 2**20  # accumulation = this / (micro_batch * seq_len * world)
    max_steps: int = 25_000
    log_interval: int = 10
    eval_interval: int = 1000  # 0: no validation (and no validation split needed)
    eval_batches: int = 50
    # none | selective (RetNet: recompute the q/k/v projections + retention core) | full (every block);
    # true/false are read as full/none
    activation_checkpointing: str = "none"
    compile: bool = False
    # < 1 (with compile): the compiled backward recomputes elementwise work (then GEMMs) instead of
    # keeping it, down to this fraction of the activations kept by default
    activation_memory_budget: float = 1.0
    resume: str = "auto"  # auto: latest valid checkpoint if any | never | <dir>/step_N | a dir holding checkpoints
    # a fresh run starts from these weights: an export dir or a DeepSpeed checkpoint (a run dir, its
    # checkpoints dir or a step dir); the model config must fit them. A resumed run loads its checkpoint.
    init_weights: Optional[str] = None
    seed: int = 1234
    max_consecutive_nonfinite: int = 5
    device: str = "auto"  # auto | cpu | cuda
    peak_flops: Optional[float] = None  # per device, for MFU; default from the GPU's name
    inject_nonfinite_at: List[int] = field(default_factory=list)  # fault injection (tests): NaN loss at these steps
    inject_nonfinite_grad_at: List[int] = field(default_factory=list)  # ... finite loss, infinite gradients

    @property
    def validates(self) -> bool:
        """Whether the run evaluates a validation split at all (eval_interval 0: never)."""
        return self.eval_interval > 0


@dataclass
class ParallelConfig:
    # Ranks per sequence: each of P consecutive ranks holds seq_len / P tokens of every sequence and
    # the retention state passes between them (retnet_train/parallel/context.py); data parallelism
    # runs over world / P groups. 1: off.
    context_parallel_size: int = 1


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # default: <run.dir>/checkpoints
    interval: int = 1000
    keep_last: int = 3
    save_at_end: bool = True  # false: only interval (and preemption) saves, e.g. for benchmark runs


@dataclass
class WandbConfig:
    mode: str = "disabled"  # online | offline | disabled
    project: str = "retnet-train"
    entity: Optional[str] = None
    name: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    required: bool = False  # W&B failing at start stops the run (false: one warning, it trains without W&B)


@dataclass
class ProfileConfig:
    # torch.profiler over optimizer steps start_step .. start_step + steps - 1 (retnet_train/components/
    # profiling.py); traces and op tables in <run.dir>/profile/rank<r>/
    enabled: bool = False
    start_step: int = 5  # after warm-up and torch.compile's first steps, which are not representative
    steps: int = 2
    ranks: List[int] = field(default_factory=lambda: [0])  # every rank is the same work; one trace is enough
    memory_snapshot: bool = False  # CUDA only: allocator history over the window, for pytorch.org/memory_viz


@dataclass
class RunConfig:
    dir: str = "runs/default"
    name: str = "default"


@dataclass
class TrainConfig:
    model: Dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    run: RunConfig = field(default_factory=RunConfig)


def checkpoint_dir(cfg: TrainConfig) -> str:
    """Where the trainer writes checkpoints: checkpoint.dir, else run.dir/checkpoints."""
    return cfg.checkpoint.dir or os.path.join(cfg.run.dir, "checkpoints")


def resolved_config(cfg: TrainConfig) -> dict:
    """The config as plain nested dicts, interpolations resolved: what config.yaml and each checkpoint hold."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def register() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


CP_KEY = "parallel.context_parallel_size"


def check_layout(size: int, world: Optional[int], seq_len: int) -> None:
    """Errors name the config key so that a bad launch fails at start, not in a collective.
    world None: not known yet (config checks before launch); only the sequence split is checked."""
    if size < 1:
        raise ValueError(f"{CP_KEY}: must be >= 1, got {size}")
    if world is not None and world % size:
        raise ValueError(
            f"{CP_KEY}={size} does not divide the world size {world}: launch a multiple of {size} ranks "
            f"or change {CP_KEY}"
        )
    if seq_len % size:
        raise ValueError(
            f"{CP_KEY}={size} does not divide data.seq_len={seq_len}: each rank holds seq_len / {size} tokens"
        )


def check_values(cfg: TrainConfig) -> None:
    """Value checks the type system cannot express; each error names its key. Sections are checked in
    order and the first bad value raises."""
    _check_data(cfg.data)
    _check_optim(cfg.optim)
    _check_deepspeed(cfg.deepspeed)
    _check_train(cfg.train)
    _check_parallel(cfg.parallel.context_parallel_size, cfg.model, cfg.data.seq_len)
    _check_retention_backend(cfg.model, cfg.parallel.context_parallel_size)
    _need(cfg.run.dir.strip(), "run.dir", "must name a directory (empty: the run would write into the current one)")
    _check_checkpoint(cfg.checkpoint)
    _check_profile(cfg.profile, cfg.train.max_steps)
    _check_wandb(cfg.wandb)


def _need(ok, key: str, msg: str) -> None:
    if not ok:
        raise ValueError(f"{key}: {msg}")


def _check_data(data: DataConfig) -> None:
    _need(data.paths, "data.paths", "no data configured")
    _need(
        not data.weights or len(data.weights) == len(data.paths),
        "data.weights",
        f"{len(data.weights)} weights for {len(data.paths)} paths",
    )
    for weight in data.weights:  # inf passes `> 0` (the loader refused it without naming data.weights)
        _need(math.isfinite(weight), "data.weights", f"{weight} is not a finite number")
    _need(all(w > 0 for w in data.weights), "data.weights", "must all be > 0")
    _need(data.seq_len > 0, "data.seq_len", "must be > 0")
    _need(data.on_change in ("refuse", "switch"), "data.on_change", f"{data.on_change!r} is not refuse|switch")


def _check_optim(optim: OptimConfig) -> None:
    # inf passes the range checks below and trains silently to NaN weights (lr, weight_decay) or
    # to no update at all (eps)
    for key in ("lr", "eps", "weight_decay"):
        value = getattr(optim, key)
        _need(not math.isinf(value), f"optim.{key}", f"{value} is not a finite number")
    _need(optim.lr > 0, "optim.lr", "must be > 0")
    _need(len(optim.betas) == 2 and all(0 <= b < 1 for b in optim.betas), "optim.betas", "two values in [0, 1)")
    _need(optim.decay in DECAYS, "optim.decay", f"{optim.decay!r} is not {'|'.join(DECAYS)}")
    fraction = optim.decay_fraction
    _need(fraction is None or 0 < fraction <= 1, "optim.decay_fraction", f"{fraction} is not in (0, 1] (or null)")
    _need(fraction is None or optim.decay != "constant", "optim.decay_fraction", "optim.decay=constant does not decay")
    _need(optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _need(optim.eps > 0, "optim.eps", "must be > 0")
    _need(optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _need(optim.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0: no clipping)")
    _need(0 <= optim.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")


def _check_deepspeed(ds: DeepSpeedConfig) -> None:
    _need(ds.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", f"{ds.zero_stage} is not 0-3")
    _need(ds.precision in PRECISIONS, "deepspeed.precision", f"{ds.precision!r} is not {'|'.join(PRECISIONS)}")
    _need(not ds.offload_param or ds.zero_stage == 3, "deepspeed.offload_param", "needs zero_stage=3")
    _need(not ds.offload_optimizer or ds.zero_stage >= 1, "deepspeed.offload_optimizer", "needs zero_stage>=1")
    _check_buckets(ds)
    check_grad_accum_dtype(ds)


def _check_buckets(ds: DeepSpeedConfig) -> None:
    """What DeepSpeed refuses only when the engine is built, after the model and the data: naming its own
    field (a pydantic error) or with an assert's traceback."""
    _need(ds.reduce_bucket_size > 0, "deepspeed.reduce_bucket_size", "must be > 0")
    size = ds.allgather_bucket_size
    _need(size >= 0, "deepspeed.allgather_bucket_size", "must be >= 0")
    _need(
        size % 2 == 0 or ds.zero_stage not in (1, 2),  # ZeRO-3 reads it as its prefetch size, ZeRO-0 not at all
        "deepspeed.allgather_bucket_size",
        f"{size} is odd; ZeRO 1 and 2 need a multiple of 2 (DeepSpeed aligns its all-gather buffers to 4 bytes)",
    )


_POSITIVE_TRAIN_KEYS = "micro_batch_size global_batch_tokens max_steps log_interval eval_batches".split()
_POSITIVE_TRAIN_KEYS += ["max_consecutive_nonfinite"]


def _check_train(train: TrainSection) -> None:
    for key in _POSITIVE_TRAIN_KEYS:
        _need(getattr(train, key) > 0, f"train.{key}", "must be > 0")
    _need(train.eval_interval >= 0, "train.eval_interval", "must be >= 0 (0: no validation)")
    # torch.manual_seed takes [-2^63, 2^64); each rank seeds with train.seed + its rank
    _need(-(2**63) <= train.seed < 2**63, "train.seed", f"{train.seed} is not in [-2^63, 2^63)")
    checkpointing_mode(train.activation_checkpointing, "train.activation_checkpointing")
    budget = train.activation_memory_budget
    _need(0 < budget <= 1, "train.activation_memory_budget", f"{budget} is not in (0, 1]")
    _need(
        budget == 1 or train.compile,
        "train.activation_memory_budget",
        f"{budget} needs train.compile=true: torch.compile's partitioner does the recomputing",
    )
    _need(train.device in ("auto", "cpu", "cuda"), "train.device", f"{train.device!r} is not auto|cpu|cuda")
    peak = train.peak_flops
    _need(peak is None or not math.isinf(peak), "train.peak_flops", f"{peak} is not a finite number")
    _need(peak is None or peak > 0, "train.peak_flops", "must be > 0 (or null)")


def _check_parallel(size: int, model: dict, seq_len: int) -> None:
    check_layout(size, None, seq_len)
    if size > 1 and model.get("arch") != "retnet":
        raise ValueError(
            f"{CP_KEY}={size} needs model.arch=retnet, got {model.get('arch')}: only the retention state "
            "passes between the ranks of a sequence"
        )


def _check_retention_backend(model: dict, cp_size: int) -> None:
    """An explicit triton backend at a key head dim its kernels refuse failed only at the first GPU forward."""
    if model.get("retention_backend") != "triton":
        return
    from ..kernels import triton_refusal
    from ..model.config import model_config_from_dict

    try:
        config = model_config_from_dict(model)
    except ValueError:
        return  # the model section's own checks name the key
    problem = triton_refusal(config, cp_size > 1)
    if problem:
        raise ValueError(problem)


def _check_checkpoint(checkpoint: CheckpointConfig) -> None:
    _need(checkpoint.interval > 0, "checkpoint.interval", "must be > 0")
    _need(checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")


def _check_profile(profile: ProfileConfig, max_steps: int) -> None:
    _need(profile.start_step >= 1, "profile.start_step", "must be >= 1 (optimizer steps count from 1)")
    _need(profile.steps >= 1, "profile.steps", "must be >= 1")
    _need(
        not profile.enabled or profile.start_step <= max_steps,
        "profile.start_step",
        f"{profile.start_step} is beyond train.max_steps={max_steps}: nothing would be profiled",
    )


def _check_wandb(wandb: WandbConfig) -> None:
    _need(
        wandb.mode in ("online", "offline", "disabled"), "wandb.mode", f"{wandb.mode!r} is not online|offline|disabled"
    )


GRAD_ACCUM_KEY = "deepspeed.grad_accum_dtype"


def check_grad_accum_dtype(ds: DeepSpeedConfig) -> None:
    """null, or fp32 where the trainer is tested with it: bf16 at ZeRO 1 without optimizer offload
    (DeepSpeed's BF16_Optimizer), or fp32 weights (fp32, bf16-mixed), whose gradients are fp32 anyway. DeepSpeed itself
    refuses bf16 with fp32 gradients at ZeRO 0; ZeRO 2/3, offload and fp16 run other optimizers."""
    value = ds.grad_accum_dtype
    if value is None or (value == "fp32" and ds.precision in FP32_WEIGHTS):
        return
    if value != "fp32":
        raise ValueError(f"{GRAD_ACCUM_KEY}: {value!r} is not fp32 (or null: the dtype of deepspeed.precision)")
    if ds.precision != "bf16" or ds.zero_stage != 1 or ds.offload_optimizer:
        raise ValueError(
            f"{GRAD_ACCUM_KEY}=fp32 needs deepspeed.precision=bf16 with deepspeed.zero_stage=1 and "
            f"deepspeed.offload_optimizer=false (DeepSpeed's BF16_Optimizer), got precision={ds.precision}, "
            f"zero_stage={ds.zero_stage}, offload_optimizer={str(ds.offload_optimizer).lower()}; "
            f"or set {GRAD_ACCUM_KEY}=null"
        )


CHECKPOINTING_MODES = ("none", "selective", "full")


def checkpointing_mode(value, key: str = "activation_checkpointing") -> str:
    """none|selective|full from a config or CLI value: booleans (also YAML/CLI "True"/"False") mean
    full/none, case is ignored; anything else is an error naming `key`."""
    mode = {"true": "full", "false": "none"}.get(str(value).lower(), str(value).lower())
    if mode not in CHECKPOINTING_MODES:
        raise ValueError(f"{key}: {value!r} is not one of none, selective, full")
    return mode


def data_sources(cfg: TrainConfig) -> dict:
    """name -> (path, weight) for the loader; a source is named after its directory."""
    weights = cfg.data.weights or [1.0] * len(cfg.data.paths)
    sources = {}
    for path, weight in zip(cfg.data.paths, weights):
        name = os.path.basename(os.path.normpath(path)) or "data"
        while name in sources:
            name += "_"
        sources[name] = (path, float(weight))
    return sources


def grad_accumulation(cfg: TrainConfig, world_size: int) -> int:
    """Micro-batches per step. Under context parallelism the P ranks of a group share their sequences,
    so the batch counts data-parallel ranks only: world_size / parallel.context_parallel_size."""
    cp = cfg.parallel.context_parallel_size
    check_layout(cp, world_size, cfg.data.seq_len)
    dp = world_size // cp
    per_step = cfg.train.micro_batch_size * cfg.data.seq_len * dp
    batch = cfg.train.global_batch_tokens
    if batch % per_step:
        dp_note = f" (world {world_size} / context_parallel_size {cp})" if cp > 1 else ""
        fits = [m for m in range(cfg.train.micro_batch_size, 0, -1) if batch % (m * cfg.data.seq_len * dp) == 0]
        fix = (
            f"train.micro_batch_size={fits[0]} or " if fits else ""
        ) + f"train.global_batch_tokens={-(-batch // per_step) * per_step}"
        raise ValueError(
            f"train.global_batch_tokens={batch} is not a multiple of micro_batch_size x seq_len x data-parallel "
            f"world = {cfg.train.micro_batch_size} x {cfg.data.seq_len} x {dp}{dp_note} = {per_step}: {fix} would be"
        )
    return cfg.train.global_batch_tokens // per_step
