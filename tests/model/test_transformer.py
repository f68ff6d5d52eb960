import pytest
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


@torch.no_grad()
def test_block_step_with_a_kv_cache_equals_the_forward():
    """TransformerBlock.step (what KV-cache decoding runs): a prompt of 6 tokens at slots 0..5, then 3
    tokens at once against the cache, give the full forward's logits."""
    from retnet_train.model.layers import rotary_sin_cos

    model = make_model().double()
    ids = torch.randint(0, 50, (2, 9))
    slots = 16
    caches = [
        (torch.zeros(2, 4, slots, 8, dtype=torch.float64), torch.zeros(2, 4, slots, 8, dtype=torch.float64))
        for _ in model.layers
    ]
    out = []
    for lo, hi in ((0, 6), (6, 9)):
        x = model.embed(ids[:, lo:hi])
        sin, cos = rotary_sin_cos(model.inv_freq, lo, hi - lo, x.dtype)
        positions = torch.arange(lo, hi)
        seen = torch.arange(slots)[None, :] <= positions[:, None]  # [3, slots]: the cache up to each token
        mask = None if lo == 0 else seen[None, None].expand(2, 1, -1, -1)
        for block, (k_cache, v_cache) in zip(model.layers, caches):
            x = block.step(x, sin, cos, k_cache, v_cache, positions, mask)
        out.append(model.lm_head(model.norm(x)))
    torch.testing.assert_close(torch.cat(out, 1), model(ids).logits, rtol=1e-10, atol=1e-10)


def test_normal_init_matches_llama_initializer_range():
    """init=normal: every linear and embedding N(0, 0.02), norms one (Hugging Face Llama's init)."""
    from retnet_train.model import build_model, model_config_from_dict

    cfg = model_config_from_dict(
        dict(
            arch="transformer",
            vocab_size=4096,
            d_model=256,
            n_layers=2,
            n_heads=4,
            ffn_dim=768,
            ffn_type="glu",
            activation="silu",
            norm="rmsnorm",
            init="normal",
        )
    )
    model = build_model(cfg)
    for name, p in model.named_parameters():
        if p.dim() == 2:
            assert abs(p.std().item() - 0.02) < 0.002, name
            assert abs(p.mean().item()) < 0.002, name
        else:
            assert torch.equal(p, torch.ones_like(p)), name


def test_torchscale_init_draws_q_k_v_each_as_its_own_xavier_matrix():
    """init=torchscale: q, k and v as torchscale's MultiheadAttention draws them, each [d, d] weight
    xavier_uniform with gain 2^-0.5 (bound gain * sqrt(6 / 2d)), not the fused [3d, d] weight as one."""
    torch.manual_seed(0)
    d = 256
    model = make_model(d_model=d, n_heads=4, init="torchscale")
    bound = 2**-0.5 * (6 / (2 * d)) ** 0.5
    for block in model.layers:
        for w in block.attention.qkv_proj.weight.detach().chunk(3):
            assert w.abs().max() <= bound
            assert abs(w.std().item() / (bound / 3**0.5) - 1) < 0.02  # uniform(-b, b) has std b / sqrt 3


def test_doc_starts_of_another_shape_raise_naming_them():
    with pytest.raises(ValueError, match="doc_starts shape"):
        make_model(document_masking=True)(torch.zeros(2, 4, dtype=torch.long), doc_starts=torch.zeros(2, 3))


@pytest.mark.parametrize("shape", [(2, 0), (0, 3)])
def test_empty_input_ids_raise_naming_them(shape):
    with pytest.raises(ValueError, match=r"input_ids is empty \(shape \(%d, %d\)\)" % shape):
        make_model()(torch.zeros(shape, dtype=torch.long))
