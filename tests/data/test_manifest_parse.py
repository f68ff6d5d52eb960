"""parse_manifest: every malformed field is refused with the manifest's path and what is wrong; a good
manifest round-trips through to_json with its provenance keys kept."""

import copy
from pathlib import Path

import pytest

from retnet_train.data.manifest import Manifest, ManifestError, ShardInfo, SplitInfo, parse_manifest

DIR = Path("/shards/web")
SHA = "cd" * 32


def good() -> dict:
    train = SplitInfo(30, 2, (ShardInfo("train_00000.bin", 20, 1, SHA), ShardInfo("train_00001.bin", 10, 1, SHA)))
    validation = SplitInfo(5, 0, (ShardInfo("validation_00000.bin", 5, 0, SHA),))
    manifest = Manifest(DIR, 1000, 2, 1, 3, 0, SHA, "uint16", 20, {"train": train, "validation": validation})
    return {**manifest.to_json(), "source": {"glob": "*.jsonl"}, "split_seed": 7}


def test_a_good_manifest_round_trips():
    m = parse_manifest(good(), DIR)
    ids = (m.eos_id, m.bos_id, m.pad_id, m.unk_id)
    assert (m.vocab_size, ids, m.dtype, m.shard_tokens, m.tokenizer_sha256) == (1000, (2, 1, 3, 0), "uint16", 20, SHA)
    assert m.split("train").shards[1] == ShardInfo("train_00001.bin", 10, 1, SHA)
    assert m.extra == {"source": {"glob": "*.jsonl"}, "split_seed": 7}
    assert m.to_json() == good()


def test_absent_special_ids_other_than_eos_are_minus_one():
    data = good()
    for key in ("bos_id", "pad_id", "unk_id"):
        del data["tokenizer"][key]
    m = parse_manifest(data, DIR)
    assert (m.eos_id, m.bos_id, m.pad_id, m.unk_id) == (2, -1, -1, -1)


def set_at(data: dict, keys: tuple, value) -> None:
    for k in keys[:-1]:
        data = data[k]
    if value is DELETE:
        del data[keys[-1]]
    else:
        data[keys[-1]] = value


DELETE = object()
SHARD0 = ("splits", "train", "shards", 0)
SHARD0_FILE = "'train_00000.bin'"

CASES = [
    ((), "top level is not a JSON object"),  # the whole document replaced by a list
    (("format",), "key 'format' is 'other', expected 'retnet-train-token-shards'"),
    (("format_version",), "format_version 'other' is not supported (this reader knows 1)"),
    (("tokenizer",), "key 'tokenizer' missing or not an object"),
    (("tokenizer", "sha256"), "key 'tokenizer.sha256' is not a sha256 hex digest"),
    (("tokenizer", "vocab_size"), "key 'tokenizer.vocab_size' must be an integer >= 1, got 'other'"),
    (("tokenizer", "eos_id"), "key 'tokenizer.eos_id' must be an id below vocab_size 1000, got 'other'"),
    (("dtype",), "key 'dtype' is 'other', expected one of ['uint16', 'uint32']"),
    (("splits",), "key 'splits' missing or has no 'train'"),
    (("splits", "test"), "split 'test' is not one of ('train', 'validation')"),
    ((*SHARD0, "file"), "splits.train.shards[0].file must be a plain file name"),
    ((*SHARD0, "sha256"), f"key 'splits.train.shards[0].sha256' is not a sha256 hex digest (shard {SHARD0_FILE})"),
    (
        (*SHARD0, "tokens"),
        f"key 'splits.train.shards[0].tokens' must be an integer >= 1, got 'other' (shard {SHARD0_FILE})",
    ),
    (
        (*SHARD0, "documents"),
        f"key 'splits.train.shards[0].documents' must be an integer >= 0, got 'other' (shard {SHARD0_FILE})",
    ),
    (("splits", "train", "tokens"), "key 'splits.train.tokens' must be an integer >= 0, got 'other'"),
    (("splits", "train", "shards"), "key 'splits.train.shards' must be a list of shard entries, got 'other'"),
    (("shard_tokens",), "key 'shard_tokens' must be an integer >= 1, got 'other'"),
]


@pytest.mark.parametrize("keys, message", CASES)
def test_each_malformed_field_is_named(keys, message):
    data = copy.deepcopy(good())
    if not keys:
        data = [data]
    elif keys[-1] == "file":
        set_at(data, keys, "../train_00000.bin")
    else:
        set_at(data, keys, "other")
    with pytest.raises(ManifestError) as e:
        parse_manifest(data, DIR)
    assert str(e.value) == f"{DIR / 'manifest.json'}: {message}"


def test_split_and_shard_consistency():
    def refused(data) -> str:
        with pytest.raises(ManifestError) as e:
            parse_manifest(data, DIR)
        return str(e.value).removeprefix(f"{DIR / 'manifest.json'}: ")

    data = good()
    data["tokenizer"]["vocab_size"] = 70_000
    assert refused(data) == "vocab_size 70000 does not fit dtype uint16"
    data = good()
    data["splits"]["train"]["tokens"] = 31
    assert refused(data) == "splits.train.tokens != sum of its shards"
    data = good()
    del data["splits"]["train"]["shards"][1]["file"]
    assert refused(data) == "splits.train.shards[1].file missing"
    data = good()
    data["splits"]["validation"]["shards"][0]["file"] = "train_00001.bin"
    assert refused(data) == "splits.validation.shards[0].file 'train_00001.bin' is also splits.train.shards[1]"


@pytest.mark.parametrize(
    "key, value, problem",
    [
        ("tokens", "10", "must be an integer >= 1, got '10'"),
        ("tokens", 10.0, "must be an integer >= 1, got 10.0"),
        ("tokens", -10, "must be an integer >= 1, got -10"),
        ("tokens", True, "must be an integer >= 1, got True"),
        ("documents", -1, "must be an integer >= 0, got -1"),
        ("documents", None, "must be an integer >= 0, got None"),
        ("sha256", "zz" * 32, "is not a sha256 hex digest"),
        ("sha256", SHA[:-1], "is not a sha256 hex digest"),
    ],
)
def test_a_bad_shard_value_names_the_shard(key, value, problem):
    """Which of a manifest's many shards is wrong: its index and its file name, besides the manifest's path."""
    data = good()
    data["splits"]["train"]["shards"][1][key] = value
    with pytest.raises(ManifestError) as e:
        parse_manifest(data, DIR)
    expected = f"key 'splits.train.shards[1].{key}' {problem} (shard 'train_00001.bin')"
    assert str(e.value) == f"{DIR / 'manifest.json'}: {expected}"


def test_a_split_that_is_not_an_object_is_named():
    data = good()
    data["splits"]["validation"] = []
    with pytest.raises(ManifestError) as e:
        parse_manifest(data, DIR)
    assert str(e.value) == f"{DIR / 'manifest.json'}: key 'splits.validation' must be an object, got []"


OPTIONAL_IDS = ("bos_id", "pad_id", "unk_id")


@pytest.mark.parametrize("key", ("eos_id", *OPTIONAL_IDS))
@pytest.mark.parametrize("value", ["1", 1.0, True, False, None, [1], 1000, -2])
def test_a_special_id_that_is_not_an_id_is_named(key, value):
    """bos_id "1" or 1.0 would reach the loader's framing and the inference prompt as a non-int or a wrong id."""
    data = good()
    data["tokenizer"][key] = value
    with pytest.raises(ManifestError) as e:
        parse_manifest(data, DIR)
    allowed = "an id below vocab_size 1000" + ("" if key == "eos_id" else " or -1 (none)")
    assert str(e.value) == f"{DIR / 'manifest.json'}: key 'tokenizer.{key}' must be {allowed}, got {value!r}"


def test_minus_one_is_no_special_id_except_eos():
    data = good()
    for key in OPTIONAL_IDS:
        data["tokenizer"][key] = -1
    m = parse_manifest(data, DIR)
    assert (m.eos_id, m.bos_id, m.pad_id, m.unk_id) == (2, -1, -1, -1)
    data["tokenizer"]["eos_id"] = -1
    with pytest.raises(ManifestError, match=r"key 'tokenizer.eos_id' must be an id below vocab_size 1000, got -1$"):
        parse_manifest(data, DIR)


def test_add_bos_needs_a_bos_id():
    data = good()
    data["add_bos"] = True
    assert parse_manifest(data, DIR).add_bos
    data["tokenizer"]["bos_id"] = -1
    with pytest.raises(ManifestError) as e:
        parse_manifest(data, DIR)
    assert str(e.value) == f"{DIR / 'manifest.json'}: key 'add_bos' is true, but key 'tokenizer.bos_id' is -1 (none)"
