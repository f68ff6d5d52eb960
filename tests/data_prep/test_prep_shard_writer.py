"""SplitShardWriter unit tests: shard contents, resume points, and restart from any of them."""

import json

import numpy as np
import pytest

from data_prep.shard_writer import Journal, SplitShardWriter, verified_prefix
from data_prep.tokenize import frame_documents

EOS = 2
SHARD = 64


def documents(n=60, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 150, size=n)  # some empty, some longer than two shards
    flat = rng.integers(3, 100_000, size=int(lengths.sum())).astype(np.int32)
    return flat, lengths


def write_all(directory, flat, lengths, doc_ids, kept=(), chunk=7, dtype=np.uint32, bos=None):
    journal = Journal(directory, "fp")
    journal.start(list(kept))
    writer = SplitShardWriter(directory, "train", np.dtype(dtype), SHARD, EOS, journal, list(kept))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    for lo in range(0, len(lengths), chunk):  # documents arrive in chunks, as from datasets.map
        hi = min(lo + chunk, len(lengths))
        keep = lengths[lo:hi] > 0  # empty texts are not documents (as in tokenize)
        tokens, framed = frame_documents(flat[offsets[lo] : offsets[hi]], lengths[lo:hi][keep], EOS, bos)
        writer.add(tokens, doc_ids[lo:hi][keep], framed)
    return writer.finish(), journal


def read_stream(directory, dtype=np.uint32):
    return np.concatenate([np.fromfile(p, dtype) for p in sorted(directory.glob("train_*.bin"))])


def test_frame_documents():
    tokens, framed = frame_documents(np.array([5, 6, 7, 8], np.int32), np.array([1, 0, 3]), EOS, None)
    assert tokens.tolist() == [5, EOS, EOS, 6, 7, 8, EOS] and framed.tolist() == [2, 1, 4]
    tokens, framed = frame_documents(np.array([5, 6], np.int32), np.array([2]), EOS, 1)
    assert tokens.tolist() == [1, 5, 6, EOS] and framed.tolist() == [4]


def test_shards_are_the_stream_cut_every_shard_tokens(tmp_path):
    flat, lengths = documents()
    info, journal = write_all(tmp_path, flat, lengths, np.arange(len(lengths)))
    expected, _ = frame_documents(flat, lengths[lengths > 0], EOS, None)
    np.testing.assert_array_equal(read_stream(tmp_path), expected)
    assert [s.tokens for s in info.shards[:-1]] == [SHARD] * (len(info.shards) - 1)
    assert info.tokens == expected.size and info.documents == int((lengths > 0).sum())
    assert (tmp_path / "train_00000.bin").stat().st_size == 4 * SHARD  # uint32 on disk


def test_resume_points_locate_the_next_token(tmp_path):
    flat, lengths = documents()
    _, journal = write_all(tmp_path, flat, lengths, np.arange(len(lengths)))
    framed = np.where(lengths > 0, lengths + 1, 0)
    written = 0
    for record in journal.read():
        doc, offset = record["resume"]
        written += record["tokens"]
        assert int(framed[:doc].sum()) + offset == written
        assert 0 <= offset < max(framed[doc] if doc < len(framed) else 1, 1)


@pytest.mark.parametrize("keep_shards", [1, 2, 5, 9])
def test_restart_from_a_kept_prefix_gives_the_same_stream(tmp_path, keep_shards):
    flat, lengths = documents(seed=1)
    full = tmp_path / "full"
    full.mkdir()
    write_all(full, flat, lengths, np.arange(len(lengths)))
    part = tmp_path / "part"
    part.mkdir()
    records = Journal(full, "fp").read()[:keep_shards]
    for r in records:
        (part / r["file"]).write_bytes((full / r["file"]).read_bytes())
    kept = verified_prefix(part, "train", records, 4)
    assert len(kept) == keep_shards
    # restart at the resume point's document, as tokenize does (earlier documents are skipped)
    start = kept[-1]["resume"][0]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    write_all(part, flat[offsets[start] :], lengths[start:], np.arange(start, len(lengths)), kept=kept)
    np.testing.assert_array_equal(read_stream(part), read_stream(full))


def test_verified_prefix_stops_at_a_damaged_shard(tmp_path):
    flat, lengths = documents()
    write_all(tmp_path, flat, lengths, np.arange(len(lengths)))
    records = Journal(tmp_path, "fp").read()
    (tmp_path / "train_00002.bin").write_bytes(b"\0" * 4 * SHARD)
    assert [r["index"] for r in verified_prefix(tmp_path, "train", records, 4)] == [0, 1]


def test_journal_from_other_settings_and_torn_lines(tmp_path):
    journal = Journal(tmp_path, "fp")
    journal.start([])
    journal.append({"split": "train", "index": 0})
    with open(journal.path, "a") as f:
        f.write('{"split": "tr')  # killed mid-line
    assert journal.read() == [{"split": "train", "index": 0}]
    with pytest.raises(FileExistsError, match="progress.jsonl: an unfinished run with different"):
        Journal(tmp_path, "other").read()
    assert json.loads(journal.path.read_text().splitlines()[0]) == {"fingerprint": "fp"}
