"""mean_loss per source: each source's loss is the one it has evaluated alone, the overall loss their
token-weighted mean, data-parallel ranks together give the one-rank result, in one collective."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from shard_fixtures import learnable_tokens, write_shard_dir  # noqa: E402

from retnet_train.components import validation  # noqa: E402
from retnet_train.components.validation import MeanLoss, mean_loss, validation_metrics  # noqa: E402
from retnet_train.data import build_validation_loader  # noqa: E402
from retnet_train.model import build_model, model_config_from_dict  # noqa: E402

SEQ, VOCAB = 8, 64


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """a: 24 validation windows of a learnable corpus; b: 12 of another (both divide over 2 ranks)."""
    root = tmp_path_factory.mktemp("sources")
    web, code = learnable_tokens(1000, VOCAB, seed=1), learnable_tokens(1000, VOCAB, seed=2) // 2 + 5
    write_shard_dir(root / "a", web[:500], web[500 : 500 + 24 * SEQ + 1], vocab_size=VOCAB)
    write_shard_dir(root / "b", code[:500], code[500 : 500 + 12 * SEQ + 1], vocab_size=VOCAB)
    return {"a": (str(root / "a"), 1.0), "b": (str(root / "b"), 1.0)}


@pytest.fixture(scope="module")
def model():
    cfg = dict(arch="retnet", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, ffn_dim=64, chunk_size=4)
    return build_model(model_config_from_dict({**cfg, "retention_backend": "torch"}))


def evaluate(model, sources, mb=5, rank=0, world=1) -> MeanLoss:
    loader = build_validation_loader(sources, SEQ, mb, rank, world)
    return mean_loss(model, loader, "cpu", sources=loader.batch_sources)


def test_each_source_has_the_loss_it_has_alone(model, sources):
    both = evaluate(model, sources)
    assert list(both.by_source) == ["a", "b"]
    for name, spec in sources.items():
        alone = evaluate(model, {name: spec})
        assert both.by_source[name].loss == pytest.approx(alone.loss, rel=1e-12)
        assert both.by_source[name].tokens == alone.tokens
        assert both.by_source[name].batches == alone.batches
    a, b = both.by_source["a"], both.by_source["b"]
    assert (a.tokens, b.tokens, a.batches, b.batches) == (24 * SEQ, 12 * SEQ, 5, 3)
    assert abs(a.loss - b.loss) > 0.01  # two distinct numbers, not the overall loss twice
    assert both.tokens == a.tokens + b.tokens and both.batches == 8
    assert both.loss == pytest.approx((a.loss * a.tokens + b.loss * b.tokens) / both.tokens, rel=1e-12)


def test_ranks_together_give_the_one_rank_losses(model, sources):
    one = evaluate(model, sources)
    ranks = [evaluate(model, sources, mb=4, rank=r, world=2) for r in range(2)]
    assert [r.batches for r in ranks] == [5, 5]  # a: 12 windows (4, 4, 4), b: 6 (4, 2) on each rank
    for name in ("a", "b"):
        parts = [r.by_source[name] for r in ranks]
        assert parts[0].tokens == parts[1].tokens
        tokens = sum(p.tokens for p in parts)
        assert tokens == one.by_source[name].tokens  # disjoint shares that cover the source
        loss = sum(p.loss * p.tokens for p in parts) / tokens
        assert loss == pytest.approx(one.by_source[name].loss, rel=1e-5)  # batches of other sizes round otherwise


def test_one_collective_reduces_every_source(model, sources, monkeypatch):
    reduced = []

    def all_reduce(tensor):  # as if a second rank had evaluated the same windows
        reduced.append(tuple(tensor.shape))
        tensor *= 2

    monkeypatch.setattr(validation, "dist", SimpleNamespace(is_initialized=lambda: True, all_reduce=all_reduce))
    loader = build_validation_loader(sources, SEQ, 5)
    alone = mean_loss(model, loader, "cpu", sources=loader.batch_sources)
    summed = mean_loss(model, loader, "cpu", sources=loader.batch_sources, sum_over_ranks=True)
    assert reduced == [(2, 2)]  # [loss x tokens, tokens] of a and b
    assert summed.tokens == 2 * alone.tokens and summed.by_source["b"].tokens == 2 * alone.by_source["b"].tokens
    assert summed.loss == pytest.approx(alone.loss, rel=1e-12)
    assert summed.by_source["a"].loss == pytest.approx(alone.by_source["a"].loss, rel=1e-12)


def test_sources_must_name_every_batch(model, sources):
    loader = build_validation_loader(sources, SEQ, 5)
    with pytest.raises(ValueError, match="sources names 7 batches, batches has 8"):
        mean_loss(model, loader, "cpu", sources=loader.batch_sources[:-1])


def test_logged_keys(model, sources):
    both = evaluate(model, sources)
    a, b = both.by_source["a"].loss, both.by_source["b"].loss
    assert validation_metrics(7, both) == pytest.approx(
        {"step": 7, "val_loss": both.loss, "val_ppl": 2.718281828459045**both.loss, "val_loss/a": a, "val_loss/b": b}
    )
    one = evaluate(model, {"a": sources["a"]})  # one source: its loss is the overall one, nothing more
    assert set(validation_metrics(7, one)) == {"step", "val_loss", "val_ppl"}
    assert set(validation_metrics(7, MeanLoss(1.0, 8, 1))) == {"step", "val_loss", "val_ppl"}  # no sources named
