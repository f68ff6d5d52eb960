"""A ZeRO-0 checkpoint trained in bf16 holds the weights twice: the module's bf16 copy and the optimizer's
fp32 masters (DeepSpeed's FP16_UnfusedOptimizer, `fp32_groups`). Loading it for inference, export or
train.init_weights gives the fp32 masters, as zero_to_fp32 gives them at ZeRO 1-3."""

from pathlib import Path

import pytest
import torch
from gen_fixtures import VOCAB, init_dist, tiny_config

from retnet_train.components.optim import param_groups
from retnet_train.inference.load import load_model
from retnet_train.model import build_model, model_config_from_dict


def train_bf16_zero0(save_dir: Path, cfg: dict, trainer_groups: bool) -> dict:
    """Two Adam steps in bf16 at ZeRO 0, saved and marked COMPLETE; {name: fp32 master weight}."""
    import deepspeed

    init_dist()
    model = build_model(model_config_from_dict(cfg))
    params = param_groups(model, 0.05, no_decay_embeddings=True) if trainer_groups else list(model.parameters())
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": 0},
        "steps_per_print": 10**9,
        "bf16": {"enabled": True},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        ids = torch.randint(0, VOCAB, (2, 9), generator=g)
        engine.backward(engine(ids[:, :-1], labels=ids[:, 1:]).loss)
        engine.step()
    engine.save_checkpoint(str(save_dir), tag="step_00000002", client_state={"config": {"model": cfg}})
    (save_dir / "step_00000002" / "COMPLETE").touch()
    names = {id(p): n for n, p in engine.module.named_parameters()}
    return {  # fp16_groups: the module's (bf16) parameters, in the order of their fp32 masters
        names[id(p)]: master.detach().clone()
        for group, masters in zip(engine.optimizer.fp16_groups, engine.optimizer.fp32_groups)
        for p, master in zip(group, masters)
    }


@pytest.mark.parametrize("trainer_groups,tied", [(True, False), (True, True), (False, False)])
def test_a_bf16_zero0_checkpoint_loads_its_fp32_master_weights(tmp_path, trainer_groups, tied):
    cfg = tiny_config(tie_embeddings=tied)
    masters = train_bf16_zero0(tmp_path / "ckpt", cfg, trainer_groups)
    loaded = load_model(str(tmp_path / "ckpt")).model.state_dict()
    assert any(not torch.equal(m, m.bfloat16().float()) for m in masters.values())  # finer than bf16
    for name, master in masters.items():
        assert loaded[name].dtype == torch.float32
        assert torch.equal(loaded[name], master), name
    if tied:
        assert torch.equal(loaded["lm_head.weight"], masters["embed_tokens.weight"])
