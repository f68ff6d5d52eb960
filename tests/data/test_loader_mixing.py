import numpy as np
import pytest
from shard_fixtures import EOS, FIRST_ID, position_tokens, write_shard_dir

from retnet_train.data import MixingSchedule, TokenLoader

SEQ = 8
OFFSETS = {"web": 0, "code": 100_000, "books": 200_000}


def source_of(row: np.ndarray) -> str:
    value = int(row.max()) - FIRST_ID  # the largest token is never EOS; offsets tell sources apart
    return max((o, n) for n, o in OFFSETS.items() if o <= value)[1]


@pytest.fixture
def sources(tmp_path):
    for name, offset in OFFSETS.items():
        # 'code' is small so it wraps into later epochs during the test
        n = 400 if name == "code" else 5000
        write_shard_dir(tmp_path / name, position_tokens(n, offset=offset), shard_tokens=700)
    return lambda weights: {n: (str(tmp_path / n), w) for n, w in weights.items()}


@pytest.mark.parametrize(
    "weights", [{"web": 0.7, "code": 0.3}, {"web": 5, "code": 3, "books": 2}, {"web": 0.97, "books": 0.03}]
)
def test_proportions_within_two_percent_over_1000_sequences(sources, weights):
    loader = TokenLoader(sources(weights), SEQ, 50, seed=11)
    rows = np.concatenate([next(loader)["input_ids"].numpy() for _ in range(20)])  # 1,000
    names = [source_of(r) for r in rows]
    total = sum(weights.values())
    for name, w in weights.items():
        assert abs(names.count(name) / 1000 - w / total) <= 0.02, (name, names.count(name))
    # also over a later window of 1,000 (not just from the start)
    rows = np.concatenate([next(loader)["input_ids"].numpy() for _ in range(20)])
    names = [source_of(r) for r in rows]
    for name, w in weights.items():
        assert abs(names.count(name) / 1000 - w / total) <= 0.02


def window_of(row: np.ndarray, offset: int) -> int:
    """Which window of its source a position-coded row is (EOS replaces some tokens; a neighbour tells)."""
    j = int(np.flatnonzero(row != EOS)[0])
    start = int(row[j]) - FIRST_ID - offset - j
    assert start % SEQ == 0, start
    return start // SEQ


def test_each_source_keeps_its_own_epoch_order(sources):
    # mixed with web, code's sequences must be the order code alone has (one window per step, no batching),
    # each epoch a permutation of all its windows
    loader = TokenLoader(sources({"web": 0.5, "code": 0.5}), SEQ, 100, seed=2)
    rows = np.concatenate([next(loader)["input_ids"].numpy() for _ in range(2)])
    code = [window_of(r, OFFSETS["code"]) for r in rows if source_of(r) == "code"]
    n_windows = (400 - 1) // SEQ
    assert len(code) == 100 >= 2 * n_windows
    alone = TokenLoader(sources({"code": 1.0}), SEQ, 1, seed=2)
    assert code == [window_of(next(alone)["input_ids"].numpy()[0], OFFSETS["code"]) for _ in range(100)]
    for epoch in range(2):
        assert sorted(code[epoch * n_windows : (epoch + 1) * n_windows]) == list(range(n_windows)), epoch
    assert code[:n_windows] != code[n_windows : 2 * n_windows]  # reshuffled for the second epoch


def test_schedule_counts_and_bijection():
    schedule = MixingSchedule({"a": 1, "b": 2})
    assert schedule.names == ["a", "b"]
    assert schedule.counts.tolist() == [5461, 10923]
    src, k = schedule.assign(np.arange(3 * schedule.period + 17))
    for s in range(2):
        np.testing.assert_array_equal(k[src == s], np.arange((src == s).sum()))  # no gaps, no repeats


@pytest.mark.parametrize(
    "weights,msg",
    [
        ({"a": 0}, "'a'.*positive"),
        ({"a": -1, "b": 1}, "'a'"),
        ({"a": 1, "b": 1e-9}, "'b'.*resolution"),
        ({}, "no data sources"),
    ],
)
def test_bad_weights(weights, msg):
    with pytest.raises(ValueError, match=msg):
        MixingSchedule(weights)


def test_a_source_read_through_is_said_once_as_its_next_epoch_begins(sources):
    """A source far smaller than its share repeats (its windows again, in a new order): the loader says so
    once per epoch, for the trainer's log, and a resumed loader does not say it again for an epoch its
    checkpoint had begun. Nothing said so: the loss fell on repeated data without a word."""
    spec = sources({"web": 0.5, "code": 0.5})
    loader = TokenLoader(spec, SEQ, 10, seed=2)
    code = loader.schedule.names.index("code")

    def code_read(batches: int) -> int:
        return int(np.count_nonzero(loader.schedule.assign(np.arange(10 * batches))[0] == code))

    notes = {}
    for batch in range(1, 31):  # 150 windows of code
        next(loader)
        notes[batch] = loader.epoch_notes()
    ends = [min(b for b in notes if code_read(b) >= epochs * 49) for epochs in (1, 2, 3)]  # 49 windows of code
    assert [b for b, said in notes.items() if said] == ends
    assert notes[ends[0]] == [
        f"data source 'code' ({spec['code'][0]}): all 49 of its sequences of {SEQ} tokens read; "
        "epoch 2 of it begins, the same sequences in a new order"
    ]
    assert "epoch 4 of it begins" in notes[ends[2]][0]
    resumed = TokenLoader(spec, SEQ, 10, seed=2)
    resumed.load_state_dict({**loader.state_dict(), "consumed_sequences": 10 * ends[0]})
    assert resumed.epoch_notes() == []
    for _ in range(ends[1] - ends[0]):
        next(resumed)
    assert "epoch 3 of it begins" in resumed.epoch_notes()[0]
