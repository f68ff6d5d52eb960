"""Bad data must fail loudly, naming the file and what is wrong."""

import json

import pytest
from shard_fixtures import TOKENIZER_SHA, VOCAB, position_tokens, write_shard_dir

from retnet_train.data import ManifestError, TokenLoader, build_validation_loader, read_manifest

SEQ = 8


@pytest.fixture
def shard_dir(tmp_path):
    write_shard_dir(tmp_path / "src", position_tokens(1000), position_tokens(100), shard_tokens=300)
    return tmp_path / "src"


def loader(path, **kw):
    return TokenLoader({"src": (str(path), 1.0)}, kw.pop("seq_len", SEQ), 2, **kw)


def test_read_manifest_fields(shard_dir):
    m = read_manifest(shard_dir)
    assert (m.vocab_size, m.eos_id, m.tokenizer_sha256, m.dtype) == (VOCAB, 2, TOKENIZER_SHA, "uint32")
    assert m.split("train").tokens == 1000 and len(m.split("train").shards) == 4
    assert m.split("validation").tokens == 100


def test_tokenizer_mismatch_names_the_manifest(shard_dir):
    with pytest.raises(ManifestError, match=rf"{shard_dir}/manifest.json.*sha256"):
        loader(shard_dir, tokenizer_sha256="cd" * 32)
    with pytest.raises(ManifestError, match=rf"{shard_dir}/manifest.json.*vocab_size {VOCAB}.*expects 8192"):
        loader(shard_dir, vocab_size=8192)
    loader(shard_dir, tokenizer_sha256=TOKENIZER_SHA, vocab_size=VOCAB)  # the right ones pass


def test_sources_from_different_tokenizers_are_refused(shard_dir, tmp_path):
    write_shard_dir(tmp_path / "other", position_tokens(1000), tokenizer_sha="cd" * 32)
    with pytest.raises(ManifestError, match="other/manifest.json"):
        TokenLoader({"a": (str(shard_dir), 1), "b": (str(tmp_path / "other"), 1)}, SEQ, 2)


def test_truncated_shard_names_the_file(shard_dir):
    shard = shard_dir / "train_00001.bin"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(ManifestError) as e:
        loader(shard_dir)
    manifest = shard_dir / "manifest.json"
    expected = f"{shard}: size 1196 bytes, but {manifest} splits.train.shards[1] says 300 uint32 tokens (1200 bytes)"
    assert expected in str(e.value)


def test_corrupt_shard_found_when_checksums_are_verified(shard_dir):
    shard = shard_dir / "train_00002.bin"
    data = bytearray(shard.read_bytes())
    data[5] ^= 0xFF
    shard.write_bytes(bytes(data))
    loader(shard_dir)  # same size: the cheap check cannot see it
    with pytest.raises(
        ManifestError,
        match=r"train_00002.bin: sha256 \w{12}\.\.\. does not match \w{12}\.\.\. in .*manifest.json "
        r"splits.train.shards\[2\]",
    ):
        loader(shard_dir, verify_checksums=True)


def test_seq_len_longer_than_source(shard_dir):
    with pytest.raises(ManifestError, match=r"seq_len 1000 is longer than source 'src'.*1000 tokens"):
        loader(shard_dir, seq_len=1000)
    loader(shard_dir, seq_len=999)  # 1000 tokens hold exactly one window of 999 + 1


def test_missing_and_malformed_manifests(shard_dir, tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        loader(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="empty/manifest.json: no manifest"):
        loader(tmp_path / "empty")
    path = shard_dir / "manifest.json"
    data = json.loads(path.read_text())
    data["splits"]["train"]["tokens"] += 1
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="splits.train.tokens != sum of its shards"):
        read_manifest(shard_dir)
    del data["tokenizer"]["sha256"]
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="tokenizer.sha256"):
        read_manifest(shard_dir)
    path.write_text("{not json")
    with pytest.raises(ManifestError, match="manifest.json: not valid JSON"):
        read_manifest(shard_dir)


def test_missing_split(tmp_path):
    write_shard_dir(tmp_path / "t", position_tokens(100))
    with pytest.raises(ManifestError, match="no split 'validation'"):
        loader(tmp_path / "t", split="validation")


def test_a_shard_listed_twice_is_refused(shard_dir):
    """A hand-edited manifest that lists a file twice would train on it twice, or on validation data."""
    path = shard_dir / "manifest.json"
    original = json.loads(path.read_text())
    for split, at in (("train", 4), ("validation", 1)):
        data = json.loads(json.dumps(original))
        data["splits"][split]["shards"].append(original["splits"]["train"]["shards"][0])
        data["splits"][split]["tokens"] += original["splits"]["train"]["shards"][0]["tokens"]
        path.write_text(json.dumps(data))
        with pytest.raises(
            ManifestError,
            match=rf"manifest.json: splits.{split}.shards\[{at}\].file 'train_00000.bin' "
            r"is also splits.train.shards\[0\]",
        ):
            read_manifest(shard_dir)


def test_a_token_id_outside_the_vocabulary_names_the_shard(tmp_path):
    """The loader checks every id it hands out (the model then need not, on the device): an id at or
    above the manifest's vocab_size is an error naming the shard and the token."""
    from retnet_train.data.token_stream import open_stream

    write_shard_dir(tmp_path / "src", position_tokens(1000), vocab_size=500, shard_tokens=300)
    stream = open_stream("src", tmp_path / "src", "train")
    assert stream.gather([0, 290], SEQ + 1).max() < 500  # ids 10..308: inside, across a shard boundary
    outside = r"train_00001.bin: token id 500 at position 190 is outside the model's vocabulary \[0, 500\)"
    with pytest.raises(ManifestError, match=outside):
        stream.gather([485], SEQ + 1)
    with pytest.raises(ManifestError, match=r"train_00001.bin: token id 500 at position 190 "):
        next(iter(loader(tmp_path / "src", seq_len=600)))


def test_token_ids_outside_the_vocabulary_are_refused_before_the_first_batch(tmp_path):
    """Shards with ids past the model's vocabulary (written for another vocabulary under this manifest)
    are refused when the loaders open, naming the shard; they failed only when a window reached one,
    which in a long run is hours or days after the start."""
    tokens = position_tokens(3000) % 400  # ids inside a vocabulary of 500 (EOS 2 stays 2)
    tokens[2150:2160] = 600  # in train_00007.bin: nowhere near the first windows
    write_shard_dir(tmp_path / "src", tokens, validation=tokens, vocab_size=500, shard_tokens=300)
    outside = r"train_00007.bin: token id 600 at position 50 is outside the model's vocabulary \[0, 500\)"
    with pytest.raises(ManifestError, match=outside):
        loader(tmp_path / "src", vocab_size=500)
    with pytest.raises(ManifestError, match=outside.replace("train", "validation")):
        build_validation_loader({"src": (str(tmp_path / "src"), 1.0)}, SEQ, 2, vocab_size=500)


def test_the_root_of_data_prep_tokenize_output_names_its_shard_directories(tmp_path):
    for name in ("web", "code"):
        write_shard_dir(tmp_path / "shards" / name, position_tokens(500), shard_tokens=300)
    with pytest.raises(ManifestError) as exc:
        loader(tmp_path / "shards")
    assert str(exc.value) == (
        f"{tmp_path / 'shards' / 'manifest.json'}: no manifest (is {tmp_path / 'shards'} a shard directory written "
        f"by data_prep.tokenize?); shard directories below it: {tmp_path / 'shards' / 'code'}, "
        f"{tmp_path / 'shards' / 'web'}"
    )
