"""DeepSpeed's bf16 ZeRO-1/2 step without its per-gradient inf/NaN test: the gradient-norm test
still skips a step with a non-finite gradient, leaving the weights as they were."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "inference"))
from gen_fixtures import init_dist, tiny_config  # noqa: E402

from retnet_train.components.config import TrainConfig  # noqa: E402
from retnet_train.components.optim import deepspeed_config, skip_duplicate_overflow_check  # noqa: E402
from retnet_train.model import build_model, model_config_from_dict  # noqa: E402

deepspeed = pytest.importorskip("deepspeed")


def engine_for(stage: int, precision: str = "bf16", grad_clip: float = 1.0):
    init_dist()
    torch.manual_seed(0)
    model = build_model(model_config_from_dict(tiny_config(n_layers=2)))
    cfg = TrainConfig()
    cfg.train.micro_batch_size, cfg.deepspeed.zero_stage, cfg.deepspeed.precision = 2, stage, precision
    cfg.optim.grad_clip = grad_clip
    config = deepspeed_config(cfg, 1, world_size=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def weights(engine) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in engine.module.parameters()])


@pytest.mark.parametrize("stage", [1, 2])
def test_nonfinite_gradient_still_skips_the_step(stage):
    engine = engine_for(stage)
    assert skip_duplicate_overflow_check(engine)
    per_gradient_tests = []
    engine.optimizer.has_overflow_partitioned_grads_serial = lambda: per_gradient_tests.append(1)
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    victim = engine.module.layers[1].ffn.fc2.weight

    def step(poison: bool) -> bool:
        hook = victim.register_hook(lambda g: g * float("inf")) if poison else None
        loss = engine(ids[:, :-1], labels=ids[:, 1:]).loss
        engine.backward(loss)
        engine.step()
        if hook:
            hook.remove()
        return engine.was_step_applied()

    assert step(False)
    before = weights(engine)
    assert not step(True)  # skipped by the norm test
    assert torch.equal(weights(engine), before)
    assert step(False) and not torch.equal(weights(engine), before)  # training goes on, finite
    assert torch.isfinite(weights(engine)).all()
    assert per_gradient_tests == []  # the dropped test never ran
    engine.destroy()


@pytest.mark.parametrize("stage, precision, grad_clip", [(1, "fp32", 1.0), (1, "bf16", 0.0), (3, "bf16", 1.0)])
def test_the_check_stays_where_nothing_else_decides(stage, precision, grad_clip):
    """fp32 has no such test to drop; without clipping DeepSpeed may not compute the norm; ZeRO-3's
    optimizer is another class."""
    engine = engine_for(stage, precision, grad_clip)
    assert not skip_duplicate_overflow_check(engine)
    engine.destroy()


def trained(stage: int, precision: str, steps: int = 3):
    """(losses, Adam step counts, weights) of an engine as build_engine makes it, `steps` steps of one batch."""
    from retnet_train.components.optim import build_engine

    init_dist()
    torch.manual_seed(0)
    model = build_model(model_config_from_dict(tiny_config(n_layers=2)))
    cfg = TrainConfig()
    cfg.train.micro_batch_size, cfg.train.max_steps = 2, 10
    cfg.deepspeed.zero_stage, cfg.deepspeed.precision = stage, precision
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-3, 0
    engine, _ = build_engine(model, cfg, 1, 1, torch.device("cpu"), load_universal=False)
    ids = torch.randint(0, 61, (2, 17), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        loss = engine(ids[:, :-1], labels=ids[:, 1:]).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    counts = {int(s["step"]) for s in engine.optimizer.optimizer.state.values()}
    result = losses, counts, weights(engine)
    engine.destroy()
    return result


def test_bf16_without_zero_starts_adam_at_step_zero():
    """bf16 at ZeRO-0 (DeepSpeed's FP16_UnfusedOptimizer) steps Adam as bf16 at ZeRO-1 does. The wrapper
    creates Adam's state by a step on zero gradients, which would count as Adam's first step (the real
    first updates ~0.74 x as large: step 2's loss 5.40 against 5.25) and decay the fp32 master weights
    once; build_engine takes that step back."""
    zero0, zero1 = trained(0, "bf16"), trained(1, "bf16")
    assert zero0[1] == zero1[1] == {3}
    assert zero0[0] == zero1[0]  # bitwise on one rank
    assert torch.equal(zero0[2], zero1[2])


def test_fp16_without_zero_reports_the_unscaled_gradient_norm():
    """fp16 at ZeRO-0 (FP16_UnfusedOptimizer, which deepspeed.initialize builds only on a GPU) logs the
    norm of the gradient itself, not of the loss-scaled one (65,536 x as large at the initial scale)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaleConfig, LossScaleProfile
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    from retnet_train.components.optim import unscale_unfused_grad_norm

    init_dist()
    w = torch.nn.Parameter(torch.tensor([1.0, 1.0], dtype=torch.float16))
    scaling = LossScaleConfig(torch.float16, True, 1.0, None, profile=LossScaleProfile.UNFUSED)
    opt = FP16_UnfusedOptimizer(torch.optim.AdamW([w], lr=0.1), loss_scale_config=scaling, clip_grad=1.0)
    assert unscale_unfused_grad_norm(opt)
    assert opt.loss_scale_config.cur_scale == 2.0**16
    opt.backward((w.float() * torch.tensor([3.0, 4.0])).sum() / 1000)  # gradient (0.003, 0.004)
    opt.step()
    assert not opt.overflow and opt._global_grad_norm == pytest.approx(0.005, rel=1e-3)


def test_fp16_without_zero_reports_the_unscaled_gradient_norm_on_deepspeed_before_0_18_6():
    """DeepSpeed 0.15 to 0.18.5 keep FP16_UnfusedOptimizer's loss scale on the optimizer (cur_scale), with no
    loss_scale_config: the wrapped step divides by that scale (it raised AttributeError at the engine's build)."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    from retnet_train.components.optim import unscale_unfused_grad_norm

    class UnfusedBefore0186(FP16_UnfusedOptimizer):
        """The attributes of FP16_UnfusedOptimizer that its step uses, as DeepSpeed 0.18.5 names them."""

        def __init__(self):
            self.cur_scale, self.overflow, self._global_grad_norm = 2.0**16, False, 0.0

        def step(self, closure=None):
            self._global_grad_norm = 0.005 * self.cur_scale  # the norm of the loss-scaled gradients
            self.cur_scale *= 2  # a scale raised after the step: the norm is the old scale's
            return self.overflow

    opt = UnfusedBefore0186()
    assert unscale_unfused_grad_norm(opt)
    opt.step()
    assert opt._global_grad_norm == pytest.approx(0.005) and opt.cur_scale == 2.0**17
