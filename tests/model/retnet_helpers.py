"""The small RetNet the model tests build, and its logits without autograd."""

import torch

from retnet_train.model import RetNetConfig, RetNetForCausalLM

VOCAB = 97


def make_model(**overrides):
    cfg = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, ffn_dim=48, chunk_size=4)
    cfg.update(overrides)
    model = RetNetForCausalLM(RetNetConfig(**cfg)).eval()
    with torch.no_grad():  # larger than the init so the score-sum clamp max(|s|, 1) is active
        for block in model.layers:
            w = block.retention.projection_weights()
            w["q"].mul_(6)
            w["k"].mul_(6)
    return model


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits
