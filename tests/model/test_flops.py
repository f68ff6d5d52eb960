import pytest

from retnet_train.model import RetNetConfig, TransformerConfig
from retnet_train.model.flops import flops_per_token


def test_six_n_and_mixer_terms():
    r = RetNetConfig(vocab_size=1000, d_model=64, n_layers=2, n_heads=2, ffn_dim=128, chunk_size=16)
    f = flops_per_token(r, 256)
    # per block: q,k 2d^2, v,g,out 3*2d^2, mlp 2*d*ffn; plus the LM head V*d
    n = 2 * (2 * 64 * 64 + 3 * 64 * 128 + 2 * 64 * 128) + 1000 * 64
    norms = 2 * (2 * 64 * 2) + 2 * 64  # LayerNorm weight+bias: two per block, one final
    assert f["six_n"] == 6 * (n + norms)
    mixer = 2 * 8.5 * (64 + 128) + 4 * 64 * 128 / 2
    assert f["model"] == pytest.approx(f["six_n"] + 3 * 2 * mixer)


def test_transformer_attention_grows_with_length():
    t = TransformerConfig(vocab_size=1000, d_model=64, n_layers=2, n_heads=2, ffn_dim=256)
    short, long = flops_per_token(t, 128), flops_per_token(t, 8192)
    assert short["six_n"] == long["six_n"]
    assert long["model"] - short["model"] == pytest.approx(3 * 2 * 4 * 64 * (8192 - 128) / 2)


def test_a_sequence_shorter_than_the_chunk_is_one_chunk_of_its_length():
    """T < C: the chunkwise form runs one chunk of T tokens, C_eff = (T + 1) / 2, not (C + 1) / 2."""
    r = RetNetConfig(vocab_size=1000, d_model=64, n_layers=2, n_heads=2, ffn_dim=128, chunk_size=64)
    f = flops_per_token(r, 16)
    mixer = 2 * 8.5 * (64 + 128) + 4 * 64 * 128 / 2
    assert f["model"] == pytest.approx(f["six_n"] + 3 * 2 * mixer)


def test_transformer_attention_counts_the_causal_half_with_its_diagonal():
    """Each query sees (T + 1) / 2 keys on average (the diagonal included): 4 d T_eff per layer."""
    t = TransformerConfig(vocab_size=1000, d_model=64, n_layers=2, n_heads=2, ffn_dim=256)
    f = flops_per_token(t, 128)
    assert f["model"] == pytest.approx(f["six_n"] + 3 * 2 * 4 * 64 * (128 + 1) / 2)


def test_tied_embeddings_keep_the_lm_head_matmul():
    """A tied LM head shares the embedding's weight but still runs its V x d matmul on every token: six_n
    is that of the untied model."""
    cfg = dict(vocab_size=1000, d_model=64, n_layers=2, n_heads=2, ffn_dim=128, chunk_size=16)
    tied, untied = (flops_per_token(RetNetConfig(**cfg, tie_embeddings=t), 256) for t in (True, False))
    assert tied == untied
