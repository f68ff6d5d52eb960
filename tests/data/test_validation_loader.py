import numpy as np
import pytest
from shard_fixtures import position_tokens, write_shard_dir

from retnet_train.data import ManifestError, build_validation_loader

SEQ = 8


@pytest.fixture
def sources(tmp_path):
    write_shard_dir(tmp_path / "a", position_tokens(500), position_tokens(201, offset=50_000), shard_tokens=64)
    write_shard_dir(tmp_path / "b", position_tokens(500, offset=100_000), position_tokens(97, offset=150_000))
    return {"a": (str(tmp_path / "a"), 0.9), "b": (str(tmp_path / "b"), 0.1)}


def expected_windows():
    a = position_tokens(201, offset=50_000)
    b = position_tokens(97, offset=150_000)
    rows = [a[i * SEQ : i * SEQ + SEQ + 1] for i in range(200 // SEQ)]
    rows += [b[i * SEQ : i * SEQ + SEQ + 1] for i in range(96 // SEQ)]
    return np.stack(rows)  # 25 + 12 windows, in source order


def test_one_pass_over_all_validation_windows(sources):
    loader = build_validation_loader(sources, SEQ, micro_batch_size=10)
    batches = list(loader)
    assert len(batches) == len(loader) == 4  # 37 windows: 10, 10, 10, 7
    assert [b["input_ids"].shape[0] for b in batches] == [10, 10, 10, 7]
    ids = np.concatenate([b["input_ids"].numpy() for b in batches])
    labels = np.concatenate([b["labels"].numpy() for b in batches])
    want = expected_windows()
    np.testing.assert_array_equal(ids, want[:, :-1])
    np.testing.assert_array_equal(labels, want[:, 1:])
    again = np.concatenate([b["input_ids"].numpy() for b in loader])  # re-iterable, same order
    np.testing.assert_array_equal(again, ids)


def test_ranks_split_validation_evenly_and_disjointly(sources):
    world = 3
    per_rank = [list(build_validation_loader(sources, SEQ, 5, dp_rank=r, dp_world_size=world)) for r in range(world)]
    assert {len(b) for b in per_rank} == {3}  # 37 // 3 = 12 per rank: batches 5, 5, 2 on every rank
    want = expected_windows()[:, :-1]
    for r, batches in enumerate(per_rank):
        got = np.concatenate([b["input_ids"].numpy() for b in batches])
        np.testing.assert_array_equal(got, want[r:36:world])


def test_max_sequences_caps_the_pass(sources):
    loader = build_validation_loader(sources, SEQ, 4, max_sequences=6)
    ids = np.concatenate([b["input_ids"].numpy() for b in loader])
    # an even spread over the 37 windows of both sources (0, 6, 12, 18, 24 of a; 30 = window 5 of b),
    # not the first 6 windows of source a alone
    np.testing.assert_array_equal(ids, expected_windows()[[0, 6, 12, 18, 24, 30], :-1])
    two_ranks = [build_validation_loader(sources, SEQ, 4, r, 2, max_sequences=6) for r in range(2)]
    got = [np.concatenate([b["input_ids"].numpy() for b in loader]) for loader in two_ranks]
    np.testing.assert_array_equal(got[0], expected_windows()[[0, 12, 24], :-1])
    np.testing.assert_array_equal(got[1], expected_windows()[[6, 18, 30], :-1])
    with pytest.raises(ValueError, match="max_sequences must be a positive integer, got -1"):
        build_validation_loader(sources, SEQ, 4, max_sequences=-1)


def test_sources_without_validation_are_skipped_with_a_warning(sources, tmp_path):
    write_shard_dir(tmp_path / "c", position_tokens(500, offset=300_000))  # no validation split
    with pytest.warns(UserWarning, match="'c'"):
        loader = build_validation_loader({**sources, "c": (str(tmp_path / "c"), 1.0)}, SEQ, 64)
    assert sum(b["input_ids"].shape[0] for b in loader) == 37
    # the validation loss needs one: the error says how to get it
    expected = (
        rf"no data source has a validation split of more than {SEQ} tokens \(sources: \['c'\]\); "
        r"the validation loss needs one: tokenize with a larger --validation-fraction \(python -m data_prep.tokenize\)"
    )
    with pytest.warns(UserWarning), pytest.raises(ManifestError, match=expected):
        build_validation_loader({"c": (str(tmp_path / "c"), 1.0)}, SEQ, 4)


def test_too_small_for_world_size(tmp_path):
    write_shard_dir(tmp_path / "t", position_tokens(500), position_tokens(20))
    with pytest.raises(ManifestError, match="fewer than dp_world_size=4"):
        build_validation_loader({"t": (str(tmp_path / "t"), 1.0)}, SEQ, 2, dp_rank=0, dp_world_size=4)
