"""A resumed run switched to another stream on purpose (switch_on_change, data.on_change=switch): each
source whose data and windowing are unchanged continues its own order after the windows the
checkpoint's stream read of it; other sources start at their beginning; the switched stream itself
resumes exactly."""

import json

import numpy as np
import pytest
from shard_fixtures import EOS, FIRST_ID, position_tokens, write_shard_dir

from retnet_train.data import MixingSchedule, TokenLoader
from retnet_train.data.stream_switch import windows_read

SEQ = 8
B_OFFSET = 100_000


@pytest.fixture
def dirs(tmp_path):
    write_shard_dir(tmp_path / "a", position_tokens(2000), shard_tokens=300)  # 249 windows
    write_shard_dir(tmp_path / "b", position_tokens(1500, offset=B_OFFSET), shard_tokens=300)
    write_shard_dir(tmp_path / "c" / "a", position_tokens(2000, offset=7), shard_tokens=300)  # other data, name a
    return tmp_path


def loader(sources, micro=4, seed=5, seq=SEQ, switch=True):
    return TokenLoader(sources, seq, micro, seed=seed, switch_on_change=switch)


def windows_of(loader, sequences, seq=SEQ):
    """(source, window) of each of the next `sequences` global sequences (micro-batch 1 per call)."""
    out = []
    for _ in range(sequences // loader.micro_batch_size):
        for row in next(loader)["input_ids"].numpy():
            i = 0 if row[0] != EOS else 1  # EOS replaces every 37th token; its neighbour still tells
            value = int(row[i]) - FIRST_ID - i
            source = "b" if value >= B_OFFSET else "a"
            out.append((source, (value - (B_OFFSET if source == "b" else 0)) // seq))
    return out


def roundtrip(state):
    return json.loads(json.dumps(state))


@pytest.mark.parametrize("weights", [{"a": 0.6, "b": 0.4}, {"a": 1.0, "b": 3.0, "c": 0.01}])
@pytest.mark.parametrize("consumed", [0, 1, 7, 16384, 40_001])
def test_windows_read_counts_what_the_schedule_assigned(weights, consumed):
    source, _ = MixingSchedule(weights).assign(np.arange(consumed))
    names = sorted(weights)
    expected = {name: int(np.count_nonzero(source == i)) for i, name in enumerate(names)}
    assert windows_read(weights, consumed) == expected


def test_a_new_source_starts_at_its_beginning_and_the_old_one_continues(dirs):
    only_a = {"a": (str(dirs / "a"), 1.0)}
    mixed = {"a": (str(dirs / "a"), 0.5), "b": (str(dirs / "b"), 0.5)}
    reference_a = windows_of(loader(only_a), 200)  # a alone, uninterrupted: its permutation order
    reference_b = windows_of(loader({"b": (str(dirs / "b"), 1.0)}), 100)
    before = loader(only_a)
    windows_of(before, 60)
    after = loader(mixed)
    after.load_state_dict(roundtrip(before.state_dict()))
    assert after.consumed == 0 and after.offsets == {"a": 60, "b": 0}
    got = windows_of(after, 200)
    assert [w for w in got if w[0] == "a"] == reference_a[60:160]
    assert [w for w in got if w[0] == "b"] == reference_b
    assert after.switched == (
        "data.on_change=switch: a new data stream from this step (source 'b' added; weights a 1 -> a 0.5, b 0.5); "
        "each source starts a at window 60 of 249, epoch 0, b at its beginning"
    )


def test_a_changed_mix_reads_no_window_twice_before_an_epoch_ends(dirs):
    first = {"a": (str(dirs / "a"), 0.8), "b": (str(dirs / "b"), 0.2)}
    second = {"a": (str(dirs / "a"), 0.2), "b": (str(dirs / "b"), 0.8)}
    before = loader(first)
    seen = windows_of(before, 100)
    after = loader(second)
    after.load_state_dict(roundtrip(before.state_dict()))
    a_read, b_read = sum(w[0] == "a" for w in seen), sum(w[0] == "b" for w in seen)
    assert after.offsets == {"a": a_read, "b": b_read} and a_read > 70  # 80 of 100, within rounding
    seen += windows_of(after, 200)
    for source, windows in (("a", 249), ("b", 187)):
        read = [w for s, w in seen if s == source]
        assert len(read) <= windows and len(set(read)) == len(read), source


def test_a_source_with_other_data_or_windowing_starts_over(dirs):
    before = loader({"a": (str(dirs / "a"), 1.0)})
    windows_of(before, 40)
    state = roundtrip(before.state_dict())
    other_data = loader({"a": (str(dirs / "c" / "a"), 1.0)})  # same name, re-tokenized
    other_data.load_state_dict(state)
    assert other_data.offsets == {"a": 0} and "holds other data" in other_data.switched
    for changed in (loader({"a": (str(dirs / "a"), 1.0)}, seed=6), loader({"a": (str(dirs / "a"), 1.0)}, seq=16)):
        changed.load_state_dict(state)  # another permutation or other windows: offsets mean nothing there
        assert changed.offsets == {"a": 0} and changed.consumed == 0


def test_switches_chain_and_a_switched_stream_resumes_exactly(dirs):
    only_a = {"a": (str(dirs / "a"), 1.0)}
    mixed = {"a": (str(dirs / "a"), 0.5), "b": (str(dirs / "b"), 0.5)}
    reference_a = windows_of(loader(only_a), 240)
    first = loader(only_a)
    windows_of(first, 40)
    second = loader(mixed)
    second.load_state_dict(roundtrip(first.state_dict()))
    middle = windows_of(second, 40)
    # the switched stream saved and resumed with the same config continues it exactly
    resumed = loader(mixed, switch=False)
    resumed.load_state_dict(roundtrip(second.state_dict()))
    assert resumed.switched is None and resumed.offsets == second.offsets
    uninterrupted = windows_of(second, 40)
    assert windows_of(resumed, 40) == uninterrupted
    third = loader(only_a)  # back to a alone: after everything the two streams read of it
    third.load_state_dict(roundtrip(resumed.state_dict()))
    a_before = 40 + sum(w[0] == "a" for w in middle + uninterrupted)
    assert third.offsets == {"a": a_before}
    assert windows_of(third, 100) == reference_a[a_before : a_before + 100]


def test_a_state_without_offsets_resumes_at_zero_offsets(dirs):
    sources = {"a": (str(dirs / "a"), 0.6), "b": (str(dirs / "b"), 0.4)}
    reference = windows_of(loader(sources), 80)
    before = loader(sources)
    windows_of(before, 40)
    state = roundtrip(before.state_dict())
    state["version"] = 1  # saved before offsets existed
    del state["offsets"]
    after = loader(sources, switch=False)
    after.load_state_dict(state)
    assert after.offsets == {"a": 0, "b": 0} and windows_of(after, 40) == reference[40:]


def test_the_switch_note_names_each_change_in_config_terms(dirs):
    before = loader({"a": (str(dirs / "a"), 1.0), "b": (str(dirs / "b"), 1.0)})
    windows_of(before, 8)
    after = loader({"a": (str(dirs / "c" / "a"), 1.0)}, seed=6)  # b dropped, a re-tokenized, another seed
    after.load_state_dict(roundtrip(before.state_dict()))
    assert after.switched == (
        "data.on_change=switch: a new data stream from this step (source 'b' dropped; source 'a' holds other "
        "data; weights a 0.5, b 0.5 -> a 1; data.seed 5 -> 6); each source starts a at its beginning"
    )
