"""Resume and data-parallel sharding: the global sequence stream is what must be preserved."""

import json

import numpy as np
import pytest
from shard_fixtures import position_tokens, write_shard_dir

from retnet_train.data import TokenLoader

SEQ = 8


@pytest.fixture
def sources(tmp_path):
    write_shard_dir(tmp_path / "a", position_tokens(2000), shard_tokens=300)
    write_shard_dir(tmp_path / "b", position_tokens(1500, offset=100_000), shard_tokens=300)
    return {"a": (str(tmp_path / "a"), 0.6), "b": (str(tmp_path / "b"), 0.4)}


def global_stream(sources, n, seed=5):
    """Reference: n global sequences from a single rank with micro-batch 1."""
    loader = TokenLoader(sources, SEQ, 1, seed=seed)
    return np.concatenate([next(loader)["input_ids"].numpy() for _ in range(n)])


def roundtrip(state):
    return json.loads(json.dumps(state))


def test_resume_gives_exactly_the_next_batches(sources):
    full = TokenLoader(sources, SEQ, 4, seed=5)
    expected = [next(full) for _ in range(10)]
    first = TokenLoader(sources, SEQ, 4, seed=5)
    for _ in range(4):
        next(first)
    resumed = TokenLoader(sources, SEQ, 4, seed=5)
    resumed.load_state_dict(roundtrip(first.state_dict()))
    for want in expected[4:]:
        got = next(resumed)
        for key in want:
            assert np.array_equal(got[key].numpy(), want[key].numpy()), key


def test_resume_with_other_micro_batch_size(sources):
    reference = global_stream(sources, 60)
    before = TokenLoader(sources, SEQ, 6, seed=5)
    consumed = np.concatenate([next(before)["input_ids"].numpy() for _ in range(3)])  # 18 sequences
    after = TokenLoader(sources, SEQ, 7, seed=5)  # e.g. accumulation 3 -> 2 micro-batches of another size
    after.load_state_dict(roundtrip(before.state_dict()))
    rest = np.concatenate([next(after)["input_ids"].numpy() for _ in range(6)])  # 42 sequences
    np.testing.assert_array_equal(np.concatenate([consumed, rest]), reference)


def rank_batches(sources, world, micro, steps, state=None):
    loaders = [TokenLoader(sources, SEQ, micro, dp_rank=r, dp_world_size=world, seed=5) for r in range(world)]
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(roundtrip(state))
    out = [[next(loader)["input_ids"].numpy() for _ in range(steps)] for loader in loaders]
    return out, loaders[0].state_dict()


def interleave(per_rank, world, micro, steps):
    """Reassemble the global order: step s, row i of rank r is global s*micro*world + i*world + r."""
    seqs = {}
    for r in range(world):
        for s in range(steps):
            for i, row in enumerate(per_rank[r][s]):
                seqs[s * micro * world + i * world + r] = row
    return np.stack([seqs[g] for g in sorted(seqs)])


def test_ranks_are_disjoint_and_cover_the_global_stream(sources):
    world, micro, steps = 4, 3, 5
    per_rank, _ = rank_batches(sources, world, micro, steps)
    reference = global_stream(sources, world * micro * steps)
    np.testing.assert_array_equal(interleave(per_rank, world, micro, steps), reference)
    # rank r holds exactly global sequences r, r + W, ...: disjoint, and together all of them
    for r in range(world):
        np.testing.assert_array_equal(np.concatenate(per_rank[r]), reference[r::world])


def test_resume_on_another_world_size(sources):
    reference = global_stream(sources, 24 + 30)
    per_rank, state = rank_batches(sources, world=2, micro=3, steps=4)  # 24 sequences
    assert state["consumed_sequences"] == 24
    assert all(len(rows) == 4 for rows in per_rank)
    np.testing.assert_array_equal(interleave(per_rank, 2, 3, 4), reference[:24])
    after, _ = rank_batches(sources, world=3, micro=2, steps=5, state=state)  # 30 more
    np.testing.assert_array_equal(interleave(after, 3, 2, 5), reference[24:])


@pytest.mark.parametrize(
    "key,value",
    [("seed", 6), ("seq_len", 16), ("weights", {"a": 0.5, "b": 0.5}), ("windows", {"a": 1, "b": 2}), ("version", 99)],
)
def test_state_from_another_stream_is_refused(sources, key, value):
    loader = TokenLoader(sources, SEQ, 2, seed=5)
    state = loader.state_dict()
    state[key] = value
    with pytest.raises(ValueError, match=key):
        loader.load_state_dict(state)
    assert loader.consumed == 0  # nothing half-applied
    if key != "version":
        state["consumed_sequences"] = 10
        switching = TokenLoader(sources, SEQ, 2, seed=5, switch_on_change=True)  # a deliberate change
        switching.load_state_dict(state)
        assert switching.consumed == 0 and key in switching.switched


def test_invalid_rank_arguments(sources):
    with pytest.raises(ValueError, match="dp_rank"):
        TokenLoader(sources, SEQ, 2, dp_rank=2, dp_world_size=2)
    with pytest.raises(ValueError, match="micro_batch_size"):
        TokenLoader(sources, SEQ, 0)


@pytest.mark.parametrize("switch_on_change", [False, True])
def test_the_same_mix_in_other_weights_resumes_exactly(sources, switch_on_change):
    """data.weights [0.6, 0.4] and [3, 2] are one mix and one stream (weights need not sum to 1): a
    resume with the other spelling continues it exactly. It was refused as another stream, or with
    data.on_change=switch restarted the mix as 'weights a 0.6, b 0.4 -> a 0.6, b 0.4'."""
    reference = global_stream(sources, 12 + 8)
    state = roundtrip(rank_batches(sources, world=1, micro=4, steps=3)[1])  # 12 sequences
    scaled = {name: (path, weight * 5) for name, (path, weight) in sources.items()}
    resumed = TokenLoader(scaled, SEQ, 4, seed=5, switch_on_change=switch_on_change)
    resumed.load_state_dict(state)
    assert resumed.switched is None and resumed.consumed == 12
    np.testing.assert_array_equal(np.concatenate([next(resumed)["input_ids"] for _ in range(2)]), reference[12:])


def test_a_refused_stream_change_names_the_config_key_that_changed(sources, tmp_path):
    """The trainer's resume refusal: the data.* key in the config's terms, every change at once. It named the
    loader's own state keys, the first alone ('loader state key 'weights' is {'a': 0.6, 'b': 0.4} but this
    loader has {...}' for a source added to data.paths)."""
    write_shard_dir(tmp_path / "c", position_tokens(900, offset=200_000), shard_tokens=300)
    state = TokenLoader(sources, SEQ, 2, seed=5).state_dict()
    added = {**sources, "c": (str(tmp_path / "c"), 0.5)}
    cases = [
        (TokenLoader(sources, 2 * SEQ, 2, seed=5), "data.seq_len: 8 -> 16"),
        (TokenLoader(sources, SEQ, 2, seed=6), "data.seed: 5 -> 6"),
        (TokenLoader(sources, 2 * SEQ, 2, seed=6), "data.seq_len: 8 -> 16; data.seed: 5 -> 6"),
        (TokenLoader(added, SEQ, 2, seed=5), "data.paths: source 'c' added"),
        (TokenLoader({"a": sources["a"]}, SEQ, 2, seed=5), "data.paths: source 'b' dropped"),
        (
            TokenLoader({"a": (sources["a"][0], 1), "b": (sources["b"][0], 1)}, SEQ, 2, seed=5),
            "data.weights: a 0.6, b 0.4 -> a 0.5, b 0.5",
        ),
    ]
    for loader, named in cases:
        with pytest.raises(ValueError) as refused:
            loader.load_state_dict(state)
        assert str(refused.value).startswith(f"the data stream is not the checkpoint's: {named}"), str(refused.value)
        assert "loader state key" not in str(refused.value)
