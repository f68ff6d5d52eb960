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


def rows(batches) -> np.ndarray:
    return np.concatenate([b["input_ids"].numpy() for b in batches])


def test_one_pass_over_all_validation_windows(sources):
    loader = build_validation_loader(sources, SEQ, micro_batch_size=10)
    batches = list(loader)
    # a batch holds one source's windows: a's 25 are 10, 10, 5; b's 12 are 10, 2
    assert len(batches) == len(loader) == 5
    assert [b["input_ids"].shape[0] for b in batches] == [10, 10, 5, 10, 2]
    assert loader.batch_sources == ["a", "a", "a", "b", "b"]
    assert set(batches[0]) == {"input_ids", "labels", "doc_starts"}  # model(**batch) takes it as before
    ids = rows(batches)
    labels = np.concatenate([b["labels"].numpy() for b in batches])
    want = expected_windows()
    np.testing.assert_array_equal(ids, want[:, :-1])
    np.testing.assert_array_equal(labels, want[:, 1:])
    np.testing.assert_array_equal(rows(loader), ids)  # re-iterable, same order


def test_ranks_split_each_source_evenly_and_disjointly(sources):
    world = 3
    loaders = [build_validation_loader(sources, SEQ, 5, dp_rank=r, dp_world_size=world) for r in range(world)]
    # per rank: 25 // 3 = 8 windows of a (batches 5, 3) and 12 // 3 = 4 of b (one batch), the same on every rank
    assert [loader.batch_sources for loader in loaders] == [["a", "a", "b"]] * world
    assert [[b["input_ids"].shape[0] for b in loader] for loader in loaders] == [[5, 3, 4]] * world
    want = expected_windows()[:, :-1]
    for r, loader in enumerate(loaders):
        # a's windows r, r + 3, ... (window 24 is a's remainder), then b's (windows 25.. of the whole)
        np.testing.assert_array_equal(rows(loader), want[[*range(r, 24, world), *range(25 + r, 37, world)]])


def test_max_sequences_caps_the_pass(sources):
    loader = build_validation_loader(sources, SEQ, 4, max_sequences=6)
    # an even spread over each source, in proportion to its windows (25 of a, 12 of b: 4 and 1),
    # not the first 6 windows of source a alone
    np.testing.assert_array_equal(rows(loader), expected_windows()[[0, 6, 12, 18, 25], :-1])
    assert loader.batch_sources == ["a", "b"]
    two_ranks = [build_validation_loader(sources, SEQ, 4, r, 2, max_sequences=6) for r in range(2)]
    # b's share rounds to 0 but every source gets at least one window per rank
    np.testing.assert_array_equal(rows(two_ranks[0]), expected_windows()[[0, 12, 25], :-1])
    np.testing.assert_array_equal(rows(two_ranks[1]), expected_windows()[[6, 18, 31], :-1])
    assert two_ranks[0].batch_sources == two_ranks[1].batch_sources == ["a", "b"]
    with pytest.raises(ValueError, match="max_sequences must be a positive integer, got -1"):
        build_validation_loader(sources, SEQ, 4, max_sequences=-1)


def test_sources_without_validation_are_skipped_with_a_warning(sources, tmp_path):
    write_shard_dir(tmp_path / "c", position_tokens(500, offset=300_000))  # no validation split
    with pytest.warns(UserWarning, match="'c'"):
        loader = build_validation_loader({**sources, "c": (str(tmp_path / "c"), 1.0)}, SEQ, 64)
    assert sum(b["input_ids"].shape[0] for b in loader) == 37 and set(loader.batch_sources) == {"a", "b"}
    # the validation loss needs one: the error says how to get it
    expected = (
        rf"no data source has a validation split of more than {SEQ} tokens \(sources: \['c'\]; the longest: 0\); "
        r"the validation loss needs one: a larger --validation-fraction \(python -m data_prep.tokenize\), or no "
        r"validation \(train.eval_interval=0; evaluate: --tasks without --data\)"
    )
    with pytest.warns(UserWarning), pytest.raises(ManifestError, match=expected):
        build_validation_loader({"c": (str(tmp_path / "c"), 1.0)}, SEQ, 4)


def test_a_validation_split_of_exactly_seq_len_tokens_is_skipped_with_a_warning(sources, tmp_path):
    """A window is seq_len + 1 tokens: a split of exactly seq_len holds none, so its source is left out
    with the warning (not an error that stops the run, as one too short for a window would be)."""
    write_shard_dir(tmp_path / "e", position_tokens(500, offset=300_000), position_tokens(SEQ, offset=350_000))
    with pytest.warns(UserWarning, match=f"'e' .* has no validation split with more than {SEQ} tokens"):
        loader = build_validation_loader({**sources, "e": (str(tmp_path / "e"), 1.0)}, SEQ, 64)
    assert loader.batch_sources == ["a", "b"]
    write_shard_dir(tmp_path / "f", position_tokens(500, offset=400_000), position_tokens(SEQ + 1, offset=450_000))
    assert build_validation_loader({"f": (str(tmp_path / "f"), 1.0)}, SEQ, 64).batch_sources == ["f"]


def test_too_small_for_world_size(tmp_path):
    write_shard_dir(tmp_path / "t", position_tokens(500), position_tokens(20))
    with pytest.raises(ManifestError, match="fewer than dp_world_size=4"):
        build_validation_loader({"t": (str(tmp_path / "t"), 1.0)}, SEQ, 2, dp_rank=0, dp_world_size=4)
    # 4 windows in all but no source with one for each of 4 ranks
    write_shard_dir(tmp_path / "u", position_tokens(500), position_tokens(20))
    two = {"t": (str(tmp_path / "t"), 1.0), "u": (str(tmp_path / "u"), 1.0)}
    with pytest.raises(ManifestError, match=r"has 4 sequences of 8 tokens \(2, 2 per source\), fewer than "):
        build_validation_loader(two, SEQ, 2, dp_rank=0, dp_world_size=4)


def test_a_source_with_fewer_windows_than_ranks_is_left_out(sources, tmp_path):
    """Every rank must run the same batches of every source (each forward may be a collective)."""
    write_shard_dir(tmp_path / "t", position_tokens(500, offset=200_000), position_tokens(20, offset=250_000))
    with pytest.warns(UserWarning, match=r"data source 't' has 2 validation sequences of 8 tokens, fewer than "):
        loaders = [
            build_validation_loader({**sources, "t": (str(tmp_path / "t"), 1.0)}, SEQ, 64, r, 4) for r in range(4)
        ]
    assert [loader.batch_sources for loader in loaders] == [["a", "b"]] * 4


def test_a_sequence_longer_than_every_validation_split_names_the_longest(sources):
    """evaluate --seq-len 100000 (or a long data.seq_len): a shorter length is the first way out."""
    with pytest.warns(UserWarning), pytest.raises(ManifestError) as e:
        build_validation_loader(sources, 100_000, 4)
    longest = int(str(e.value).split("the longest: ")[1].split(")")[0])
    assert 0 < longest < 100_000
    assert f"needs one: a sequence length below {longest} (data.seq_len; evaluate: --seq-len), " in str(e.value)
