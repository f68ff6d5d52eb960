"""On resume the optimizer and scheduler state come from the checkpoint (Adam moments, step count), and
the optim.* settings from this run's config: a changed optim.lr, weight_decay, betas or eps takes effect
as warmup_steps, decay and max_steps do; unchanged ones resume bit for bit."""

import os

import torch

from retnet_train.components.checkpoint import CheckpointManager, client_state
from retnet_train.components.config import TrainConfig
from retnet_train.components.optim import build_optimizer, lr_lambda
from retnet_train.components.resume import load_checkpoint
from retnet_train.components.train_state import TrainState


class Engine:
    """What DeepSpeed's engine does with the optimizer and LR scheduler on save and load."""

    def __init__(self, cfg: TrainConfig):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(4, 4)  # weight: decayed group; bias: no-decay group
        self.optimizer, self.lr_scheduler = build_optimizer(self.model, cfg, torch.device("cpu"))

    def train(self, steps: int) -> None:
        for _ in range(steps):
            self.model(torch.ones(2, 4)).square().sum().backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
            self.lr_scheduler.step()

    def save_checkpoint(self, directory, tag, client_state, save_latest):
        os.makedirs(os.path.join(directory, tag), exist_ok=True)
        state = {
            **client_state,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
        }
        torch.save(state, os.path.join(directory, tag, "mp_rank_00_model_states.pt"))

    def load_checkpoint(self, directory, tag):
        state = torch.load(os.path.join(directory, tag, "mp_rank_00_model_states.pt"), weights_only=False)
        self.optimizer.load_state_dict(state.pop("optimizer"))
        self.lr_scheduler.load_state_dict(state.pop("lr_scheduler"))
        return tag, state


def config(**optim) -> TrainConfig:
    cfg = TrainConfig()
    cfg.train.max_steps = 10
    for key, value in {"lr": 1e-3, "warmup_steps": 2, "decay": "linear", **optim}.items():
        setattr(cfg.optim, key, value)
    return cfg


def saved_run(tmp_path, steps: int = 4, **optim):
    engine = Engine(config(**optim))
    engine.train(steps)
    manager = CheckpointManager(str(tmp_path), keep_last=2, rank=0)
    state = TrainState(step=steps, tokens_seen=steps * 8)
    manager.save(engine, steps, client_state({"train_state": state}))
    return engine, manager


def resume(manager, cfg: TrainConfig, tag: str = "step_00000004") -> Engine:
    engine = Engine(cfg)
    state = TrainState()
    load_checkpoint(manager, engine, (manager.dir, tag), None, {"train_state": state}, 1234, {})
    assert state.step == 4
    return engine


def hyper(engine: Engine) -> list:
    return [
        {k: g[k] for k in ("lr", "initial_lr", "weight_decay", "betas", "eps")} for g in engine.optimizer.param_groups
    ]


def test_unchanged_settings_resume_exactly(tmp_path):
    saved, manager = saved_run(tmp_path)
    resumed = resume(manager, config())
    assert hyper(resumed) == hyper(saved)
    assert resumed.lr_scheduler.get_last_lr() == saved.lr_scheduler.get_last_lr()
    assert resumed.lr_scheduler.last_epoch == 4
    saved.train(3)
    resumed.train(3)
    assert hyper(resumed) == hyper(saved)  # the schedule goes on alike


def test_changed_optim_settings_take_effect_and_the_moments_are_kept(tmp_path):
    saved, manager = saved_run(tmp_path)
    cfg = config(lr=1e-4, weight_decay=0.2, betas=[0.8, 0.9], eps=1e-6)
    cfg.train.max_steps = 20
    resumed = resume(manager, cfg)
    next_lr = 1e-4 * lr_lambda(4, 2, 20, "linear", 0.0)  # the lr of step 5 under the new settings
    common = {"lr": next_lr, "initial_lr": 1e-4, "betas": (0.8, 0.9), "eps": 1e-6}
    assert hyper(resumed) == [{**common, "weight_decay": 0.2}, {**common, "weight_decay": 0.0}]
    assert resumed.lr_scheduler.base_lrs == [1e-4, 1e-4]
    assert resumed.lr_scheduler.get_last_lr() == [next_lr, next_lr]
    # the checkpoint's Adam state is what the run continues with
    for p_saved, p_resumed in zip(saved.optimizer.param_groups, resumed.optimizer.param_groups):
        for a, b in zip(p_saved["params"], p_resumed["params"]):
            assert torch.equal(saved.optimizer.state[a]["exp_avg"], resumed.optimizer.state[b]["exp_avg"])
            assert float(resumed.optimizer.state[b]["step"]) == 4
    resumed.train(1)
    assert resumed.lr_scheduler.get_last_lr() == [1e-4 * lr_lambda(5, 2, 20, "linear", 0.0)] * 2


def lrs(engine: Engine, steps: int) -> list:
    """The rates of the next `steps` optimizer steps."""
    out = []
    for _ in range(steps):
        out.append(engine.lr_scheduler.get_last_lr()[0])
        engine.train(1)
    return out


def test_raising_max_steps_in_the_stable_phase_moves_the_decay_later(tmp_path):
    """Warm-up-stable-decay over the last half: 10 steps decay from index 5; resumed at step 4 with
    max_steps 20 the peak holds through index 10 and the decay takes the last 10 steps, no jump."""
    saved, manager = saved_run(tmp_path, decay_fraction=0.5)
    cfg = config(decay_fraction=0.5)
    cfg.train.max_steps = 20
    resumed = resume(manager, cfg)
    assert resumed.lr_scheduler.get_last_lr() == saved.lr_scheduler.get_last_lr() == [1e-3, 1e-3]
    assert lrs(saved, 3) == [1e-3, 1e-3, 1e-3 * 0.8]  # indices 4, 5, 6 of the 10-step run
    extended = lrs(resumed, 16)  # indices 4 to 19
    assert extended[:7] == [1e-3] * 7
    assert extended[7:] == [1e-3 * (1 - k / 10) for k in range(1, 10)]
    assert resumed.lr_scheduler.get_last_lr() == [0.0, 0.0]  # after the last step: lr x min_lr_ratio
