"""deepspeed.grad_accum_dtype: the DeepSpeed config it gives, the combinations it refuses, and bf16 with
fp32 gradient accumulation (DeepSpeed's BF16_Optimizer) on CPU: each micro-batch's gradient summed once,
a trainer run, its checkpoints resumed exactly and loaded by the other optimizer class."""

import sys
from pathlib import Path

import pytest
import torch
from trainer_helpers import losses, shards, typed  # noqa: F401 (shards: a fixture)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "inference"))
from gen_fixtures import init_dist, tiny_config  # noqa: E402

from retnet_train.components.config import TrainConfig, check_values  # noqa: E402
from retnet_train.components.optim import build_optimizer, deepspeed_config  # noqa: E402
from retnet_train.model import build_model, model_config_from_dict  # noqa: E402

deepspeed = pytest.importorskip("deepspeed")
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer  # noqa: E402
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer  # noqa: E402

KEY = "deepspeed.grad_accum_dtype"
ACCUM = 2


def config(precision="bf16", stage=1, grad_accum_dtype=None, offload=False) -> TrainConfig:
    cfg = TrainConfig()
    cfg.data.paths = ["/d/web"]
    cfg.train.micro_batch_size = 2
    ds = cfg.deepspeed
    ds.precision, ds.zero_stage, ds.grad_accum_dtype, ds.offload_optimizer = precision, stage, grad_accum_dtype, offload
    return cfg


def test_deepspeed_config_carries_it_only_when_set():
    default = deepspeed_config(config(), ACCUM, world_size=1)
    assert "data_types" not in default and "communication_data_type" not in default  # DeepSpeed's defaults
    cfg = config(grad_accum_dtype="fp32")
    check_values(cfg)
    ds_config = deepspeed_config(cfg, ACCUM, world_size=1)
    assert ds_config["data_types"] == {"grad_accum_dtype": "fp32"}
    assert ds_config["communication_data_type"] == "fp32"  # the sum is all-reduced in fp32 too
    for stage in (0, 1, 2, 3):  # fp32 training: its gradients are fp32 already, at any stage
        check_values(config("fp32", stage, "fp32"))


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"grad_accum_dtype": "float32"}, f"{KEY}: 'float32' is not fp32"),
        ({"grad_accum_dtype": "bf16"}, f"{KEY}: 'bf16' is not fp32 (or null"),
        ({"grad_accum_dtype": "fp32", "stage": 0}, "got precision=bf16, zero_stage=0, offload_optimizer=false"),
        ({"grad_accum_dtype": "fp32", "stage": 2}, "got precision=bf16, zero_stage=2"),
        ({"grad_accum_dtype": "fp32", "stage": 3}, "got precision=bf16, zero_stage=3"),
        ({"grad_accum_dtype": "fp32", "offload": True}, "zero_stage=1, offload_optimizer=true"),
        ({"grad_accum_dtype": "fp32", "precision": "fp16"}, "got precision=fp16"),
    ],
)
def test_values_and_combinations_deepspeed_does_not_run_are_refused_naming_the_key(change, needle):
    with pytest.raises(ValueError) as info:
        check_values(config(**change))
    assert str(info.value).startswith(KEY) and needle in str(info.value) and "\n" not in str(info.value)


def engine(grad_accum_dtype):
    init_dist()
    torch.manual_seed(0)
    model = build_model(model_config_from_dict(tiny_config(n_layers=2)))
    cfg = config(grad_accum_dtype=grad_accum_dtype)
    optimizer, scheduler = build_optimizer(model, cfg, torch.device("cpu"))
    ds_config = deepspeed_config(cfg, ACCUM, world_size=1)
    e, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return e


def batches(n):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 61, (2, 9), generator=g) for _ in range(n)]


def test_each_micro_batch_gradient_is_summed_once_in_fp32():
    """The gradient norm BF16_Optimizer clips with is that of the fp32 sum of the micro-batches' bf16
    gradients (of loss / accumulation), each taken once: DeepSpeed clears the bf16 gradients before each
    backward in a hook on the model output, which it finds in a dict output only (CausalLMOutput)."""
    e = engine("fp32")
    assert isinstance(e.optimizer, BF16_Optimizer)
    reference = build_model(model_config_from_dict(tiny_config(n_layers=2))).to(torch.bfloat16)
    reference.load_state_dict(e.module.state_dict())
    total = [torch.zeros(p.shape) for p in reference.parameters()]
    for ids in batches(ACCUM):
        reference.zero_grad()
        (reference(ids[:, :-1], labels=ids[:, 1:]).loss / ACCUM).backward()
        total = [t + p.grad.float() for t, p in zip(total, reference.parameters())]
        loss = e(ids[:, :-1], labels=ids[:, 1:]).loss
        e.backward(loss)
        e.step()
    assert e.was_step_applied()
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in total])).item()
    assert e.get_global_grad_norm() == pytest.approx(expected, rel=1e-5)
    e.destroy()


def test_the_optimizer_steps_with_the_exact_fp32_sum():
    """After the step's last backward DeepSpeed all-reduces BF16_Optimizer's fp32 sum in its communication
    dtype, bf16 by default, which would round the sum to bf16 even on one rank: the gradient the optimizer
    steps with is, bit for bit, the fp32 sum of the micro-batches' bf16 gradients."""
    e = engine("fp32")
    params = list(e.module.parameters())
    total = [torch.zeros(p.shape) for p in params]
    for i, ids in enumerate(batches(ACCUM)):
        e.backward(e(ids[:, :-1], labels=ids[:, 1:]).loss)
        total = [t + p.grad.float() for t, p in zip(total, params)]  # p.grad: this micro-batch's, in bf16
        if i < ACCUM - 1:
            e.step()
    assert e.is_gradient_accumulation_boundary()  # reduced, not stepped yet
    summed = [deepspeed.utils.safe_get_full_grad(p) for p in params]
    assert all(s.dtype == torch.float32 and torch.equal(s, t) for s, t in zip(summed, total))
    assert not all(torch.equal(t, t.bfloat16().float()) for t in total)  # a bf16 round trip would show
    e.destroy()


def adam_state(e) -> list:
    base = e.optimizer.optimizer
    return [
        (p.detach().clone(), base.state[p]["exp_avg"].clone(), base.state[p]["exp_avg_sq"].clone())
        for g in base.param_groups
        for p in g["params"]
    ]


@pytest.mark.parametrize("saved,loaded", [("fp32", None), (None, "fp32")])
def test_a_checkpoint_loads_into_the_other_optimizer_class(tmp_path, saved, loaded):
    """Both write bf16_zero_pp_rank_* with fp32 master weights and Adam moments in the same layout:
    a run can switch grad_accum_dtype on resume."""
    first = engine(saved)
    for ids in batches(2 * ACCUM):
        first.backward(first(ids[:, :-1], labels=ids[:, 1:]).loss)
        first.step()
    first.save_checkpoint(str(tmp_path), tag="t")
    second = engine(loaded)
    assert {type(first.optimizer), type(second.optimizer)} == {BF16_Optimizer, DeepSpeedZeroOptimizer}
    second.load_checkpoint(str(tmp_path), tag="t")
    for a, b in zip(adam_state(first), adam_state(second), strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(p, q) for p, q in zip(first.module.parameters(), second.module.parameters()))
    assert second.lr_scheduler.get_last_lr() == first.lr_scheduler.get_last_lr()
    first.destroy()
    second.destroy()


def test_trainer_run_resumes_exactly(shards, tmp_path, process_group, capsys):  # noqa: F811
    from retnet_train.trainer import Trainer

    common = {
        "deepspeed.precision": "bf16",
        "deepspeed.zero_stage": 1,
        "deepspeed.grad_accum_dtype": "fp32",
        "checkpoint.interval": 2,
        "checkpoint.keep_last": 5,
    }
    reference = Trainer(typed(shards, tmp_path / "reference", **{**common, "train.max_steps": 4}))
    reference.train()
    assert isinstance(reference.engine.optimizer, BF16_Optimizer)
    assert reference.engine.get_data_types() == (torch.bfloat16, torch.float32)

    run = tmp_path / "run"
    Trainer(typed(shards, run, **{**common, "train.max_steps": 2})).train()
    assert sorted(p.name for p in (run / "checkpoints" / "step_00000002").glob("*optim_states.pt")) == [
        "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    ]
    capsys.readouterr()
    summary = Trainer(typed(shards, run, **{**common, "train.max_steps": 4})).train()
    assert "resumed from" in capsys.readouterr().out and summary["step"] == 4
    ref, got = losses(tmp_path / "reference"), losses(run)
    assert sorted(got) == [1, 2, 3, 4]
    assert [got[s] for s in (1, 2, 3, 4)] == [ref[s] for s in (1, 2, 3, 4)]  # bitwise
