import torch

from retnet_train.model import TransformerConfig, TransformerForCausalLM


def make_model(**kw):
    cfg = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, ffn_dim=64)
    return TransformerForCausalLM(TransformerConfig(**{**cfg, **kw})).eval()


def test_causal():
    model = make_model()
    ids = torch.randint(0, 50, (2, 16))
    changed = ids.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 50
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-5)
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-3


def test_document_masking_equals_separate_documents():
    model = make_model(document_masking=True)
    d1, d2 = torch.randint(0, 50, (1, 6)), torch.randint(0, 50, (1, 9))
    starts = torch.zeros(1, 15, dtype=torch.bool)
    starts[0, 6] = True
    with torch.no_grad():
        packed = model(torch.cat([d1, d2], 1), doc_starts=starts).logits
        # RoPE is relative, so document 2 at offset 6 equals document 2 alone
        separate = torch.cat([model(d1).logits, model(d2).logits], 1)
    assert (packed - separate).abs().max() < 1e-4


def test_trains():
    model = make_model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, 8, (4, 17))
    first = None
    for _ in range(30):
        loss = model(data[:, :-1], labels=data[:, 1:]).loss
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.6 * first
