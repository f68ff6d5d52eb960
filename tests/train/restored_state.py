"""Worker for test_resume_restored_state (through trainer_helpers.run_scenarios): run_scenarios.py's
scenarios, each recording the state a resume must give back to <out>/rank<R>.pt. A run with a
checkpoint path in train.resume builds the Trainer, restores it and records what it restored; any other
run trains, drawing from every RNG at each step, and records its state as it was when it saved at its
last step.

The record: per parameter its full fp32 weight, Adam's exp_avg and exp_avg_sq (gathered from every
ZeRO partition) and the module's own weight; the Adam steps and hyperparameters of the optimizer's
param groups; the LR scheduler's step and LR; the train state; the loader's state and the token rows
of the next step's micro-batches; this rank's python, numpy and torch RNG states."""

import random
from pathlib import Path

import numpy as np
import torch
from run_scenarios import main  # this script's directory is first on sys.path

HYPER = ("lr", "betas", "eps", "weight_decay")


def parameters(engine) -> dict:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    optimizer = engine.optimizer
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO 1/2 and BF16_Optimizer link the moments to the parameters at the first step; a restored
        # engine has taken none
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()
    out = {}
    for name, p in engine.module.named_parameters():  # every call below is a collective under ZeRO
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
            module = p.detach().clone()
        out[name] = {
            "module": module,
            "fp32": safe_get_full_fp32_param(p).clone(),
            "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").clone(),
            "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").clone(),
        }
    return out


def record(trainer, out: Path) -> None:
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    inner = trainer.engine.optimizer.optimizer  # the torch optimizer inside DeepSpeed's (ZeRO 1-3 here)
    state = {
        "parameters": parameters(trainer.engine),
        "adam_steps": sorted({float(s["step"]) for s in inner.state.values()}),
        "param_groups": [{k: g[k] for k in HYPER} for g in inner.param_groups],
        "scheduler": (trainer.scheduler.last_epoch, trainer.scheduler.get_last_lr()),
        "train_state": trainer.state.state_dict(),
        "loader": trainer.loader.state_dict(),
        "rng": rng,
        "seed": trainer.cfg.train.seed,
        "dp_rank": trainer.rank // trainer.cfg.parallel.context_parallel_size,
    }
    # last: it moves the loader on
    state["next_rows"] = torch.cat([next(trainer.loader)["input_ids"] for _ in range(trainer.accum)])
    torch.save(state, out / f"rank{trainer.rank}.pt")


def run_one(cfg, out: Path):
    from retnet_train.trainer import Trainer

    if cfg.train.resume not in ("auto", "never"):
        trainer = Trainer(cfg)
        try:
            trainer.build()
            trainer.restore()
            record(trainer, out)
        finally:
            trainer.close()
        return None

    class Recorded(Trainer):
        def train_step(self):
            # each step draws from every RNG, as dropout would: what the checkpoint saves is not the
            # state a fresh build seeds
            random.random(), np.random.random(), torch.rand(1)
            return super().train_step()

        def save(self):
            path = super().save()
            if self.state.step == self.cfg.train.max_steps:
                record(self, out)
            return path

    return Recorded(cfg).train()


if __name__ == "__main__":
    from retnet_train.components.process_exit import end_before_teardown

    end_before_teardown()
    main(run_one)
