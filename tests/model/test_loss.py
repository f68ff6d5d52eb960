"""The causal-LM loss (model/loss.py): labels of -100 are ignored, and the chunked loss without
full logits equals the loss over the full logits, gradients included."""

import torch
from retnet_helpers import VOCAB, make_model


def test_loss_ignores_minus_100():
    model = make_model()
    ids = torch.randint(0, VOCAB, (1, 10))
    labels = ids.clone()
    labels[0, 5:] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
        ref = torch.nn.functional.cross_entropy(out.logits[0, :5], ids[0, :5])
    assert abs(out.loss.item() - ref.item()) < 1e-6


def test_chunked_loss_equals_full_logits_loss():
    import retnet_train.model.loss as loss_module

    model = make_model().train()
    ids = torch.randint(0, VOCAB, (3, 21))
    labels = torch.roll(ids, -1, 1)
    labels[1, 4:9] = -100
    results = []
    for return_logits in (True, False):
        model.zero_grad()
        out = model(ids, labels=labels, return_logits=return_logits)
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad.clone() for p in model.parameters()]))
        assert (out.logits is None) == (not return_logits)
    old = loss_module.CHUNK_BYTES
    loss_module.CHUNK_BYTES = 4 * VOCAB * 5  # 5 tokens per chunk: exercises the chunk loop
    try:
        model.zero_grad()
        out = model(ids, labels=labels, return_logits=False)
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad.clone() for p in model.parameters()]))
        with torch.no_grad():
            eval_loss = model(ids, labels=labels, return_logits=False).loss
    finally:
        loss_module.CHUNK_BYTES = old
    ref_loss, ref_grads = results[0]
    assert abs(eval_loss - ref_loss) < 1e-5
    for loss, grads in results[1:]:
        assert abs(loss - ref_loss) < 1e-5
        for a, b in zip(grads, ref_grads):
            assert (a - b).abs().max() < 1e-5
