"""Incremental decoding (prefill + step) reproduces the full forward's logits, per row, for
prompts of different lengths in one left-padded batch; the RetNet state does not grow."""

import pytest
import torch

from retnet_train.inference.decoding import left_pad
from retnet_train.inference.kv_cache import KVCacheDecoder
from retnet_train.inference.recurrent import RetNetDecoder
from retnet_train.model import RetNetConfig, TransformerConfig, build_model

SMALL = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=2, ffn_dim=64, norm_eps=1e-6)


def _model(arch, **kw):
    cfg = (
        RetNetConfig(**SMALL, chunk_size=4, retention_backend="torch", **kw)
        if arch == "retnet"
        else TransformerConfig(**SMALL, **kw)
    )
    return build_model(cfg).double().eval()


def _decoder(model, B, max_length):
    return (
        RetNetDecoder(model, B, state_dtype=torch.float64)
        if arch_of(model) == "retnet"
        else KVCacheDecoder(model, B, max_length)
    )


def arch_of(model):
    return model.config.arch


CASES = [
    ("retnet", {}),
    ("retnet", {"normalize_retention": False, "document_masking": False}),
    (
        "retnet",
        {"norm": "rmsnorm", "ffn_type": "glu", "activation": "silu", "head_norm_affine": True, "embed_scale": True},
    ),
    ("transformer", {}),
    ("transformer", {"norm": "rmsnorm", "embed_scale": True}),
]


@pytest.mark.parametrize("arch,kw", CASES)
@torch.no_grad()
def test_prefill_and_steps_match_full_forward(arch, kw):
    model = _model(arch, **kw)
    with torch.no_grad():  # a non-trivial head-norm scale, so a wrong use of it shows
        for n, p in model.named_parameters():
            if "group_norm_weight" in n:
                p.uniform_(0.5, 1.5)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (11, 6, 1)]
    new = torch.randint(0, 97, (3, 7), generator=g)  # tokens fed after the prompts
    ids, starts, _ = left_pad(prompts, pad_id=5, device="cpu")
    dec = _decoder(model, 3, ids.shape[1] + new.shape[1])
    got = [dec.prefill(ids, starts)]
    for t in range(new.shape[1]):
        got.append(dec.step(new[:, t]))
    got = torch.stack(got, dim=1)  # [B, 1 + steps, V]
    for i, p in enumerate(prompts):
        full = torch.cat([torch.tensor(p), new[i]])[None]
        ref = model(full).logits[0, len(p) - 1 :]
        torch.testing.assert_close(got[i], ref, rtol=1e-9, atol=1e-9)


@torch.no_grad()
def test_retnet_state_is_independent_of_prompt_length():
    model = _model("retnet")
    sizes = []
    for T in (3, 40):
        dec = RetNetDecoder(model, 2)
        dec.prefill(torch.randint(0, 97, (2, T)))
        sizes.append(dec.state_bytes())
    assert sizes[0] == sizes[1] == 2 * 2 * 2 * 16 * (32 + 1) * 4  # B L H K (V+1) fp32


def test_decoder_rejects_wrong_batch_and_too_long_prompt():
    model = _model("transformer")
    dec = KVCacheDecoder(model, 2, 8)
    with pytest.raises(ValueError, match="batch of 3"):
        dec.prefill(torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="max_length=8"):
        dec.prefill(torch.zeros(2, 8, dtype=torch.long))


@pytest.mark.parametrize("arch", ["retnet", "transformer"])
def test_prefill_of_an_empty_prompt_says_so(arch):
    dec = _decoder(_model(arch), 2, 8)
    with pytest.raises(ValueError, match="prefill: empty prompt"):
        dec.prefill(torch.zeros(2, 0, dtype=torch.long))


@torch.no_grad()
def test_prefill_in_pieces_equals_whole():
    model = _model("retnet")
    ids, starts, _ = left_pad([list(range(1, 30)), list(range(5, 14))], pad_id=0, device="cpu")
    whole, pieces = RetNetDecoder(model, 2, torch.float64), RetNetDecoder(model, 2, torch.float64)
    a, b = whole.prefill(ids, starts), pieces.prefill(ids, starts, piece=7)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    for s, t in zip(whole.states, pieces.states):
        torch.testing.assert_close(s, t, rtol=1e-9, atol=1e-9)
    assert int(pieces.position) == 29 and pieces.doc_position.tolist() == [29, 9]


@torch.no_grad()
def test_bf16_prefill_sums_its_state_exactly(monkeypatch):
    """The prefill asks the torch forms for the exact fp32 final state (keep_state) in every layer and
    piece, not the bf16 scan's last row that a training forward takes."""
    import retnet_train.kernels.torch_retention as torch_retention

    calls = []
    real = torch_retention._final_state
    monkeypatch.setattr(torch_retention, "_final_state", lambda *a: (calls.append(1), real(*a))[1])
    dec = RetNetDecoder(_model("retnet").to(torch.bfloat16), 2)
    dec.prefill(torch.randint(0, 97, (2, 32)), piece=16)
    assert len(calls) == 2 * 2  # layers x pieces
    assert all(s.dtype == torch.float32 for s in dec.states)


@pytest.mark.parametrize("arch", ["retnet", "transformer"])
@torch.no_grad()
def test_snapshot_restore_undoes_steps(arch):
    """What CUDA-graph warm-up relies on: steps taken after a snapshot leave no trace once restored."""
    model = _model(arch)
    ids = torch.randint(0, 97, (2, 9))
    a, b = _decoder(model, 2, 20), _decoder(model, 2, 20)
    a.prefill(ids), b.prefill(ids)
    snap = b.snapshot()
    for t in (5, 6, 7):
        b.step(torch.tensor([t, t + 1]), starts=torch.tensor([t == 6, False]))  # a document start too
    b.restore(snap)
    for t in (11, 12, 13):
        torch.testing.assert_close(b.step(torch.tensor([t, 3])), a.step(torch.tensor([t, 3])), rtol=0, atol=0)
