"""What a resume refuses before building anything (reshard.plan, the trainer's and the preflight's check):
model settings that change what the weights compute, and a checkpoint that must be converted for this
layout but sits where it cannot be written."""

import os

import pytest
import torch

from retnet_train.components.reshard import UNIVERSAL, plan

TINY = {"arch": "retnet", "vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 2, "ffn_dim": 64}
LAYOUT = {"world_size": 1, "zero_stage": 1, "precision": "fp32"}


def checkpoint(tmp_path, model=TINY, layout=LAYOUT):
    tag = tmp_path / "step_00000002"
    tag.mkdir()
    state = {"module": {}, "layout": layout, "config": {"model": dict(model)}}
    torch.save(state, tag / "mp_rank_00_model_states.pt")
    return tag


@pytest.mark.parametrize(
    "change, named",
    [
        ({"n_heads": 4}, "model.n_heads: 2 -> 4"),
        ({"norm_eps": 1e-5}, "model.norm_eps: 1e-06 -> 1e-05"),
        ({"document_masking": False}, "model.document_masking: True -> False"),
        ({"arch": "transformer", "n_heads": 2}, "model.arch: retnet -> transformer"),
    ],
)
def test_a_change_of_what_the_weights_compute_is_refused(tmp_path, change, named):
    tag = checkpoint(tmp_path)
    with pytest.raises(ValueError) as e:
        plan(str(tmp_path), tag.name, LAYOUT, {**TINY, **change})
    assert str(e.value).startswith(f"train.resume: {tag} was trained with other model settings ({named}")
    assert f"train.init_weights={tag}" in str(e.value)


def test_how_the_function_is_computed_may_change(tmp_path):
    """Forms, chunk, backend, recompute and init keep the function; a default written out is no change."""
    tag = checkpoint(tmp_path)
    same = {"mode": "parallel", "chunk_size": 16, "retention_backend": "torch", "retention_recompute": False}
    plan(str(tmp_path), tag.name, LAYOUT, {**TINY, **same, "init": "normal", "norm_eps": 1e-6})
    plan(str(tmp_path), tag.name, LAYOUT)  # no model given: the layout alone


def test_a_checkpoint_that_needs_converting_where_it_cannot_be_written_is_refused_before_loading(tmp_path, monkeypatch):
    """(The conversion itself refused it, after every rank had started, in a message with its prefix twice.)"""
    from retnet_train.components import reshard

    tag = checkpoint(tmp_path, layout={**LAYOUT, "world_size": 2})
    real_access = os.access
    monkeypatch.setattr(reshard.os, "access", lambda p, mode: False if mode == os.W_OK else real_access(p, mode))
    with pytest.raises(ValueError, match=f"^train.resume: {tag} must be converted .* is not writable"):
        plan(str(tmp_path), tag.name, LAYOUT, TINY)
    (tag / UNIVERSAL).mkdir()
    assert plan(str(tmp_path), tag.name, LAYOUT, TINY).universal  # converted before: read-only is fine


def test_a_change_of_which_parameters_decay_is_refused(tmp_path):
    """optim.no_decay_embeddings moves the embedding between the optimizer's two groups, whose saved
    moments then do not fit (ZeRO 0: torch's 'parameter group that doesn't match the size'; ZeRO 1-2:
    DeepSpeed's 'parameter-alignment layout'; ZeRO 3: a tensor size mismatch, none naming the key)."""
    tag = tmp_path / "step_00000002"
    tag.mkdir()
    state = {"module": {}, "layout": LAYOUT, "config": {"model": TINY, "optim": {"no_decay_embeddings": True}}}
    torch.save(state, tag / "mp_rank_00_model_states.pt")
    with pytest.raises(ValueError) as e:
        plan(str(tmp_path), tag.name, LAYOUT, TINY, no_decay_embeddings=False)
    assert str(e.value).startswith(
        f"train.resume: {tag} was trained with optim.no_decay_embeddings=True, this run has False"
    )
    plan(str(tmp_path), tag.name, LAYOUT, TINY, no_decay_embeddings=True)  # unchanged: resumes
    plan(str(tmp_path), tag.name, LAYOUT, TINY)  # not given: not checked


def test_every_refusal_of_the_plan_is_named_at_once(tmp_path):
    """Model settings, weight-decay groups, what the caller refused (another data stream) and the layout, in one
    error: each as it would be alone, numbered; one refusal alone is as it was."""
    tag = checkpoint(tmp_path, model={**TINY, "n_heads": 2}, layout={**LAYOUT, "zero_stage": 0, "precision": "bf16"})
    data = f"train.resume: {tag}: data_loader: the data stream is not the checkpoint's: data.seed: 1 -> 7"
    with pytest.raises(ValueError) as e:
        plan(str(tmp_path), tag.name, {**LAYOUT, "precision": "fp32"}, {**TINY, "n_heads": 4}, refused=[data])
    message = str(e.value)
    assert message.startswith(f"train.resume: {tag} cannot be resumed with this config, for 3 reasons"), message
    assert "(1) it was trained with other model settings (model.n_heads: 2 -> 4)" in message
    assert "(2) data_loader: the data stream is not the checkpoint's: data.seed: 1 -> 7." in message
    assert "(3) it was written with deepspeed.zero_stage=0" in message
    assert message.endswith(
        "Resume with deepspeed.zero_stage=0 and deepspeed.precision=bf16; any world size works "
        "at the saved ZeRO stage, and only 1 <-> 2 can change on resume."
    )
    with pytest.raises(ValueError) as e:
        plan(str(tmp_path), tag.name, {**LAYOUT, "zero_stage": 0, "precision": "bf16"}, TINY, refused=[data])
    assert str(e.value) == data
