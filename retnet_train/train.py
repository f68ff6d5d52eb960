"""Pretraining entry point (Hydra app; config root configs/config.yaml).

    python -m retnet_train.train experiment=tiny_cpu
    torchrun --nproc_per_node=8 -m retnet_train.train experiment=retnet_1.3b_8k wandb.mode=online
    deepspeed --num_gpus 8 --module retnet_train.train experiment=retnet_1.3b_8k
"""
from __future__ import annotations

import os
import sys

import hydra
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from .components.config import TrainConfig, register
from .components.faults import TrainingError
from .trainer import Trainer

def run(cfg: TrainConfig) -> dict:
    """Train per the config; returns the Trainer's summary. For drivers that build or compose a
    TrainConfig themselves; it initializes the process group when none exists."""
    return Trainer(cfg).train()


register()


def _absorb_launcher_args() -> None:
    """The `deepspeed` launcher appends --local_rank=N (unless --no_local_rank): keep it out of
    Hydra's overrides, in the environment where torchrun would have put it."""
    for arg in list(sys.argv[1:]):
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
            sys.argv.remove(arg)


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    typed: TrainConfig = OmegaConf.to_object(cfg)
    try:
        run(typed)
    except (ValueError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    _absorb_launcher_args()
    main()
