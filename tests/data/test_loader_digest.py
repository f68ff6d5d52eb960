"""The loader state names each source's data by digest: a resume onto other data under the same
source name is refused; the same data at another path, and a state saved without digests, resume."""

import json
import shutil

import numpy as np
import pytest
from shard_fixtures import EOS, position_tokens, write_shard_dir
from test_megatron_source import write_mmidx

from retnet_train.data import TokenLoader

SEQ = 8


def roundtrip(state):
    return json.loads(json.dumps(state))


def batches(loader, n):
    return np.concatenate([next(loader)["input_ids"].numpy() for _ in range(n)])


def test_same_name_other_data_is_refused(tmp_path):
    """A re-tokenized corpus in another directory of the same basename and the same size."""
    write_shard_dir(tmp_path / "v1" / "web", position_tokens(2000), shard_tokens=300)
    write_shard_dir(tmp_path / "v2" / "web", position_tokens(2000, offset=5), shard_tokens=300)
    before = TokenLoader({"web": (tmp_path / "v1" / "web", 1.0)}, SEQ, 2, seed=5)
    next(before)
    state = roundtrip(before.state_dict())
    after = TokenLoader({"web": (tmp_path / "v2" / "web", 1.0)}, SEQ, 2, seed=5, change_hint="; what to do")
    assert after.windows == before.windows  # name and window count alone do not tell them apart
    with pytest.raises(ValueError) as exc:
        after.load_state_dict(state)
    message = str(exc.value)
    assert message.startswith(
        "the data stream is not the checkpoint's: "
        f"data source 'web' at {tmp_path / 'v2' / 'web'} holds other data than the checkpoint's source 'web' "
        f"(at {tmp_path / 'v1' / 'web'} when it was saved): digest "
    )
    assert message.endswith("; what to do")
    assert after.consumed == 0
    after.switch_on_change = True  # data.on_change=switch: a deliberate change of data
    after.load_state_dict(state)
    assert "holds other data" in after.switched and after.consumed == 0 and after.offsets == {"web": 0}


def test_same_data_at_another_path_resumes(tmp_path):
    """A moved corpus (and its manifest's provenance rewritten) continues exactly where it stopped."""
    write_shard_dir(tmp_path / "old" / "web", position_tokens(2000), shard_tokens=300)
    shutil.copytree(tmp_path / "old" / "web", tmp_path / "new" / "web")
    manifest = tmp_path / "new" / "web" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "source": "moved"}))
    reference = batches(TokenLoader({"web": (tmp_path / "old" / "web", 1.0)}, SEQ, 2, seed=5), 6)
    before = TokenLoader({"web": (tmp_path / "old" / "web", 1.0)}, SEQ, 2, seed=5)
    batches(before, 2)
    after = TokenLoader({"web": (tmp_path / "new" / "web", 1.0)}, SEQ, 2, seed=5)
    after.load_state_dict(roundtrip(before.state_dict()))
    np.testing.assert_array_equal(batches(after, 4), reference[4:])


def test_state_without_digests_resumes(tmp_path):
    """A checkpoint written before the loader state held its sources' digests."""
    write_shard_dir(tmp_path / "web", position_tokens(2000), shard_tokens=300)
    reference = batches(TokenLoader({"web": (tmp_path / "web", 1.0)}, SEQ, 2, seed=5), 6)
    before = TokenLoader({"web": (tmp_path / "web", 1.0)}, SEQ, 2, seed=5)
    batches(before, 2)
    state = roundtrip(before.state_dict())
    assert set(state.pop("sources")) == {"web"}
    after = TokenLoader({"web": (tmp_path / "web", 1.0)}, SEQ, 2, seed=5)
    after.load_state_dict(state)
    np.testing.assert_array_equal(batches(after, 4), reference[4:])


def test_megatron_source_of_other_data_is_refused(tmp_path):
    """Same prefix name and the same sequence, document and token counts: the documents in another order
    (another shuffle seed)."""
    rng = np.random.default_rng(0)
    docs = [np.append(rng.integers(10, 900, size=n), EOS) for n in (40, 50, 60)]
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    write_mmidx(tmp_path / "a" / "pile", docs)
    write_mmidx(tmp_path / "b" / "pile", [docs[1], docs[0], docs[2]])
    before = TokenLoader({"pile": (tmp_path / "a" / "pile", 1.0)}, SEQ, 2, eos_id=EOS)
    after = TokenLoader({"pile": (tmp_path / "b" / "pile", 1.0)}, SEQ, 2, eos_id=EOS)
    assert after.windows == before.windows
    with pytest.raises(ValueError, match=f"data source 'pile' at {tmp_path / 'b' / 'pile'} holds other data"):
        after.load_state_dict(roundtrip(before.state_dict()))
    TokenLoader({"pile": (tmp_path / "a" / "pile.idx", 1.0)}, SEQ, 2, eos_id=EOS).load_state_dict(before.state_dict())
