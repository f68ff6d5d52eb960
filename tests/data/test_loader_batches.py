import json

import numpy as np
import pytest
import torch
from shard_fixtures import EOS, FIRST_ID, position_tokens, write_shard_dir

from retnet_train.data import TokenLoader

SEQ = 16


def window_starts(batch_ids: np.ndarray, offset: int = 0) -> np.ndarray:
    """Stream position of each row's first token (rows are position-coded, see shard_fixtures)."""
    starts = []
    for row in batch_ids:
        j = int(np.flatnonzero(row != EOS)[0])
        starts.append(int(row[j]) - FIRST_ID - offset - j)
    return np.array(starts)


@pytest.fixture
def source(tmp_path):
    # 1,001 tokens over 3 shards of 400: 62 windows of 16 (+1), windows crossing shard edges
    tokens = position_tokens(1001)
    write_shard_dir(tmp_path / "src", tokens, shard_tokens=400)
    return {"src": (str(tmp_path / "src"), 1.0)}, tokens


def test_batch_layout_matches_stream(source):
    sources, tokens = source
    loader = TokenLoader(sources, seq_len=SEQ, micro_batch_size=5, seed=3)
    batch = next(loader)
    assert set(batch) == {"input_ids", "labels", "doc_starts"}
    assert batch["input_ids"].dtype == torch.int64 and batch["labels"].dtype == torch.int64
    assert batch["doc_starts"].dtype == torch.bool
    assert batch["input_ids"].shape == batch["labels"].shape == batch["doc_starts"].shape == (5, SEQ)
    ids, labels = batch["input_ids"].numpy(), batch["labels"].numpy()
    for row, start in zip(range(5), window_starts(ids)):
        assert start % SEQ == 0  # windows are aligned to the seq_len stride
        window = tokens[start : start + SEQ + 1]
        np.testing.assert_array_equal(ids[row], window[:-1])
        np.testing.assert_array_equal(labels[row], window[1:])  # labels are already shifted
    starts = batch["doc_starts"].numpy()
    assert not starts[:, 0].any()
    np.testing.assert_array_equal(starts[:, 1:], ids[:, :-1] == EOS)
    assert starts.any()  # docs of 37 tokens: some window must contain a boundary


def test_one_epoch_visits_every_window_once_then_reshuffles(source):
    sources, tokens = source
    n_windows = (len(tokens) - 1) // SEQ
    loader = TokenLoader(sources, seq_len=SEQ, micro_batch_size=n_windows, seed=0)
    epoch0 = window_starts(next(loader)["input_ids"].numpy())
    epoch1 = window_starts(next(loader)["input_ids"].numpy())
    np.testing.assert_array_equal(np.sort(epoch0), np.arange(n_windows) * SEQ)
    np.testing.assert_array_equal(np.sort(epoch1), np.arange(n_windows) * SEQ)
    assert not np.array_equal(epoch0, epoch1)  # a new order per epoch
    assert not np.array_equal(epoch0, np.arange(n_windows) * SEQ)  # shuffled at all


def test_order_is_a_function_of_the_seed(source):
    sources, _ = source
    a = [next(TokenLoader(sources, SEQ, 8, seed=7))["input_ids"] for _ in range(2)]
    b = TokenLoader(sources, SEQ, 8, seed=8)
    assert torch.equal(a[0], a[1])
    assert not torch.equal(a[0], next(b)["input_ids"])


def test_state_dict_is_json(source):
    sources, _ = source
    loader = TokenLoader(sources, SEQ, 4, seed=1)
    next(loader)
    state = json.loads(json.dumps(loader.state_dict()))
    assert state["consumed_sequences"] == 4
    assert state["windows"] == {"src": 62}


def test_accepts_mapping_specs(source, tmp_path):
    sources, _ = source
    path = sources["src"][0]
    a = next(TokenLoader({"src": {"path": path, "weight": 2.0}}, SEQ, 4, seed=1))
    b = next(TokenLoader({"src": path}, SEQ, 4, seed=1))
    assert torch.equal(a["input_ids"], b["input_ids"])
