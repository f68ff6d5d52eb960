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


def test_fp16_gradients_do_not_underflow_before_the_loss_scale():
    """fp16 (DeepSpeed's loss scaling): the logits' gradients are (softmax - one_hot) / tokens, here
    ~1e-7 (a 32000 vocabulary at 8k tokens: ~4e-9, below fp16's smallest value 2^-24); divided before
    backward brings the loss scale, they rounded to fp16's few subnormals (or to 0: every head row that
    was no target got no gradient). Gradients of a scaled fp16 loss match fp64's to fp16 rounding."""
    from retnet_train.model.loss import linear_cross_entropy

    torch.manual_seed(0)
    n, d, vocab = 2048, 16, 4096
    hidden, weight = torch.randn(n, d), torch.randn(vocab, d) * 0.05  # near-uniform softmax
    labels = torch.randint(0, vocab // 8, (n,))  # rows >= vocab / 8 are never a target
    grads = []
    for dtype, loss_scale in ((torch.float64, 1.0), (torch.float16, 1024.0)):
        h, w = hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
        (linear_cross_entropy(h, w, labels) * loss_scale).backward()
        assert (h.grad.dtype, w.grad.dtype) == (dtype, dtype)
        grads.append((h.grad.double() / loss_scale, w.grad.double() / loss_scale))
    (ref_h, ref_w), (got_h, got_w) = grads
    never = slice(vocab // 8, None)
    assert (got_w - ref_w)[never].norm() <= 2e-3 * ref_w[never].norm()  # 15% before
    assert (got_h - ref_h).norm() <= 1e-3 * ref_h.norm()  # 0.8% before
