"""What the model is evaluated for: DeepSpeed's ZeRO knobs, the hardware, the presets, units."""

from __future__ import annotations

from dataclasses import dataclass

from ...components.config import TrainConfig

# The trainer's defaults: the typed config is their only home (as for bench/engine.py's DeepSpeed config).
TRAINER_DEFAULTS = TrainConfig()
GiB = 2**30
BF16, FP32 = 2, 4
GLOBAL_BATCH_TOKENS = TRAINER_DEFAULTS.train.global_batch_tokens  # the paper's 4M-token batches


@dataclass(frozen=True)
class DeepSpeedSettings:
    """The ZeRO knobs that cost memory. `trainer()` is what components/optim.py builds from the
    trainer's defaults; `library_defaults()` is what DeepSpeed picks when a config names only the
    stage (`--deepspeed-defaults`)."""

    reduce_bucket_size: int = 500_000_000  # elements
    allgather_bucket_size: int = 500_000_000
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    prefetch_bucket_size: int = 500_000_000  # ZeRO-3: stage3_prefetch_bucket_size
    max_live_parameters: int = 1_000_000_000  # ZeRO-3: stage3_max_live_parameters (DeepSpeed default)
    persistence_threshold: int = 100_000  # ZeRO-3: params below this many elements stay gathered
    sub_group_size: int = 1_000_000_000  # ZeRO-3: parameters per optimizer sub-step (DeepSpeed default)

    @classmethod
    def trainer(cls) -> "DeepSpeedSettings":
        ds = TRAINER_DEFAULTS.deepspeed
        # components/optim.py: ZeRO-3 gets stage3_prefetch_bucket_size = allgather_bucket_size
        return cls(
            reduce_bucket_size=ds.reduce_bucket_size,
            allgather_bucket_size=ds.allgather_bucket_size,
            overlap_comm=ds.overlap_comm,
            contiguous_gradients=ds.contiguous_gradients,
            prefetch_bucket_size=ds.allgather_bucket_size,
        )

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
    peak_flops: float = 989e12  # H100/H200 dense bf16 (components/metrics.py DEVICE_FIGURES)
    utilization: float = 0.25  # executed FLOPs / peak: conservative next to the measured mfu_model (docs/benchmarks.md)
    memory_gib: float = 79.2  # H100 80GB as torch reports it; H200: 139.8


def bus_bandwidth(n_gpus: int, hw: Hardware) -> float:
    """Bytes/s each GPU moves in a ring collective: NVLink inside one node, else its NIC."""
    if n_gpus <= hw.gpus_per_node:
        return hw.nvlink_gbyte_per_gpu * 1e9 * hw.efficiency
    return hw.ib_gbit_per_gpu / 8 * 1e9 * hw.efficiency


def load_preset(name: str, **overrides):
    from ..presets import load_preset as _load

    return _load(name, **overrides)
