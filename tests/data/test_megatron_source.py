"""Megatron-LM / GPT-NeoX MMIDIDX datasets as loader sources, written here from the documented
format (magic, version, dtype code, counts, sizes int32, pointers int64, document indices int64)."""

import struct

import numpy as np
import pytest

from retnet_train.data import ManifestError, TokenLoader, build_validation_loader, read_megatron_index

EOS = 0  # GPT-2 style EOD id, unlike our shards'
SEQ = 8


def write_mmidx(prefix, documents, dtype=np.uint16, code=8, magic=b"MMIDIDX\x00\x00", doc_idx=None):
    """`documents` are the sequences; by default one per document (Megatron's GPT layout)."""
    sizes = np.array([len(d) for d in documents], dtype="<i4")
    itemsize = np.dtype(dtype).itemsize
    pointers = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype("<i8") * itemsize
    doc_idx = np.arange(len(documents) + 1, dtype="<i8") if doc_idx is None else np.asarray(doc_idx, dtype="<i8")
    with open(f"{prefix}.idx", "wb") as f:
        f.write(magic + struct.pack("<Q", 1) + struct.pack("<B", code))
        f.write(struct.pack("<Q", len(sizes)) + struct.pack("<Q", len(doc_idx)))
        f.write(sizes.tobytes() + pointers.tobytes() + doc_idx.tobytes())
    with open(f"{prefix}.bin", "wb") as f:
        f.write(np.concatenate(documents).astype(np.dtype(dtype).newbyteorder("<")).tobytes())


def documents(n_docs=9, seed=0):
    rng = np.random.default_rng(seed)
    return [np.append(rng.integers(1, 50_000, size=int(rng.integers(3, 30))), EOS) for _ in range(n_docs)]


def test_reads_index_fields(tmp_path):
    docs = documents()
    write_mmidx(tmp_path / "c_text_document", docs)
    idx = read_megatron_index(tmp_path / "c_text_document.idx")
    assert idx.dtype == np.uint16
    np.testing.assert_array_equal(idx.sizes, [len(d) for d in docs])
    np.testing.assert_array_equal(idx.pointers[1:] // 2, np.cumsum([len(d) for d in docs])[:-1])
    np.testing.assert_array_equal(idx.document_indices, np.arange(len(docs) + 1))


@pytest.mark.parametrize("spelling", ["c_text_document", "c_text_document.bin", "c_text_document.idx"])
def test_loader_reads_the_concatenated_documents(tmp_path, spelling):
    docs = documents()
    write_mmidx(tmp_path / "c_text_document", docs)
    stream = np.concatenate(docs)
    n_windows = (len(stream) - 1) // SEQ
    loader = TokenLoader({"meg": (str(tmp_path / spelling), 1.0)}, SEQ, n_windows, seed=0, eos_id=EOS)
    batch = next(loader)
    ids, labels = batch["input_ids"].numpy(), batch["labels"].numpy()
    windows = {tuple(stream[i * SEQ : i * SEQ + SEQ + 1]) for i in range(n_windows)}
    got = {tuple(np.append(row, lab[-1])) for row, lab in zip(ids, labels)}
    assert got == windows  # one epoch = every window once
    np.testing.assert_array_equal(batch["doc_starts"].numpy()[:, 1:], ids[:, :-1] == EOS)


def test_int32_tokens(tmp_path):
    docs = [np.array([70_000, 70_001, EOS]), np.array([5, 6, 7, 8, EOS])]
    write_mmidx(tmp_path / "big", docs, dtype=np.int32, code=4)
    batch = next(TokenLoader({"m": (str(tmp_path / "big"), 1.0)}, 7, 1, eos_id=EOS))
    assert batch["input_ids"].numpy().tolist() == [[70_000, 70_001, EOS, 5, 6, 7, 8]]


def test_needs_eos_and_rejects_documents_without_it(tmp_path):
    docs = documents()
    docs[3] = docs[3][:-1]  # a document without EOD (tokenized without --append-eod)
    write_mmidx(tmp_path / "m", docs)
    with pytest.raises(ManifestError, match=r"m.idx: 1 of 9 documents do not end with EOS id 0 \(first: document 3\)"):
        TokenLoader({"m": (str(tmp_path / "m"), 1.0)}, SEQ, 2, eos_id=EOS)
    with pytest.raises(ManifestError, match="does not record the EOS id; pass eos_id"):
        TokenLoader({"m": (str(tmp_path / "m"), 1.0)}, SEQ, 2)


def test_corrupt_files(tmp_path):
    write_mmidx(tmp_path / "bad", documents(), magic=b"NOTMMIDX\x00")
    with pytest.raises(ManifestError, match=r"bad.idx: not an MMIDIDX index"):
        TokenLoader({"m": (str(tmp_path / "bad"), 1.0)}, SEQ, 2, eos_id=EOS)
    write_mmidx(tmp_path / "short", documents())
    with open(tmp_path / "short.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ManifestError, match=r"short.bin: size 10 bytes"):
        TokenLoader({"m": (str(tmp_path / "short"), 1.0)}, SEQ, 2, eos_id=EOS)
    write_mmidx(tmp_path / "float", documents(), dtype=np.float32, code=7)
    with pytest.raises(ManifestError, match="dtype code 7 is not an integer"):
        TokenLoader({"m": (str(tmp_path / "float"), 1.0)}, SEQ, 2, eos_id=EOS)


def test_has_no_validation_split(tmp_path):
    write_mmidx(tmp_path / "m", documents())
    with pytest.raises(ManifestError, match="has no 'validation' split"):
        TokenLoader({"m": (str(tmp_path / "m"), 1.0)}, SEQ, 2, split="validation", eos_id=EOS)
    with pytest.warns(UserWarning, match="'m'"), pytest.raises(ManifestError, match="no data source"):
        build_validation_loader({"m": (str(tmp_path / "m"), 1.0)}, SEQ, 2, eos_id=EOS)


def test_eos_id_comes_from_a_shard_source_when_mixed(tmp_path):
    from shard_fixtures import EOS as SHARD_EOS
    from shard_fixtures import position_tokens, write_shard_dir

    docs = [np.append(np.arange(20, 40 + i), SHARD_EOS) for i in range(8)]
    write_mmidx(tmp_path / "meg", docs)
    write_shard_dir(tmp_path / "shards", position_tokens(500), vocab_size=50_000)
    loader = TokenLoader({"a_meg": (str(tmp_path / "meg"), 1.0), "b_shards": (str(tmp_path / "shards"), 1.0)}, SEQ, 4)
    assert loader.eos_id == SHARD_EOS
    assert list(loader.streams) == ["a_meg", "b_shards"]
    next(loader)


def test_documents_of_several_sequences(tmp_path):
    # sentence-split data: documents [s0 s1] [s2] [s3 s4]; EOD only after a document's last sentence
    seqs = [np.array([5, 6]), np.array([7, EOS]), np.array([8, 9, EOS]), np.array([10]), np.array([11, 12, EOS])]
    write_mmidx(tmp_path / "s", seqs, doc_idx=[0, 2, 3, 5])
    batch = next(TokenLoader({"m": (str(tmp_path / "s"), 1.0)}, 10, 1, eos_id=EOS))
    assert batch["input_ids"].tolist() == [[5, 6, 7, EOS, 8, 9, EOS, 10, 11, 12]]
    assert batch["labels"].tolist() == [[6, 7, EOS, 8, 9, EOS, 10, 11, 12, EOS]]
    assert batch["doc_starts"].tolist() == [[False] * 4 + [True] + [False] * 2 + [True] + [False] * 2]
    write_mmidx(tmp_path / "bad", seqs, doc_idx=[0, 1, 3, 5])  # document 0 would end with sentence s0: no EOD
    with pytest.raises(ManifestError, match=r"1 of 3 documents do not end with EOS id 0 \(first: document 0\)"):
        TokenLoader({"m": (str(tmp_path / "bad"), 1.0)}, 4, 1, eos_id=EOS)


@pytest.mark.parametrize("doc_idx", [[0, 3, 100], [0, 5, 3, 9], [2, 5, 9]])
def test_damaged_document_index(tmp_path, doc_idx):
    write_mmidx(tmp_path / "m", documents(), doc_idx=doc_idx)
    with pytest.raises(ManifestError, match=r"m.idx: document index is not a non-decreasing list from 0 to at most 9"):
        TokenLoader({"m": (str(tmp_path / "m"), 1.0)}, SEQ, 2, eos_id=EOS)


def test_token_ids_outside_the_vocabulary(tmp_path):
    write_mmidx(tmp_path / "m", documents())  # ids up to 50,000
    with pytest.raises(
        ManifestError,
        match=r"m.bin: token id \d+ at position \d+ is outside the model's vocabulary "
        r"\[0, 32000\); was it tokenized with another tokenizer\?",
    ):
        TokenLoader({"m": (str(tmp_path / "m"), 1.0)}, SEQ, 2, eos_id=EOS, vocab_size=32000)
    TokenLoader({"m": (str(tmp_path / "m"), 1.0)}, SEQ, 2, eos_id=EOS, vocab_size=50_000)
    write_mmidx(tmp_path / "neg", [np.array([3, -5, 7, EOS])] * 4, dtype=np.int32, code=4)
    with pytest.raises(ManifestError, match=r"neg.bin: token id -5 at position 1 is outside"):
        TokenLoader({"m": (str(tmp_path / "neg"), 1.0)}, SEQ, 1, eos_id=EOS, vocab_size=32000)


def test_half_a_dataset_or_its_directory(tmp_path):
    write_mmidx(tmp_path / "m", documents())
    (tmp_path / "m.bin").unlink()
    for spelling in ("m", "m.idx"):
        with pytest.raises(ManifestError, match=r"m.bin is missing \(.*m.idx exists; a Megatron dataset needs both\)"):
            TokenLoader({"m": (str(tmp_path / spelling), 1.0)}, SEQ, 2, eos_id=EOS)
    (tmp_path / "d").mkdir()
    write_mmidx(tmp_path / "d" / "c_text_document", documents())
    with pytest.raises(
        ManifestError,
        match=r"d has no manifest.json but holds Megatron indexes; give the prefix of "
        r"one as the path, e.g. .*d/c_text_document$",
    ):
        TokenLoader({"m": (str(tmp_path / "d"), 1.0)}, SEQ, 2, eos_id=EOS)


def test_more_documents_than_the_eod_checks(tmp_path):
    from retnet_train.data.megatron import MAX_EOD_CHECKS

    # an even spread of the documents is checked for EOD; an empty document (repeated index) comes first
    n = MAX_EOD_CHECKS + 1
    docs = [np.array([5, 6, EOS])] * n
    doc_idx = np.concatenate([[0], np.arange(n + 1)])
    write_mmidx(tmp_path / "m", docs, doc_idx=doc_idx)
    loader = TokenLoader({"m": (str(tmp_path / "m"), 1.0)}, SEQ, 2, eos_id=EOS)
    assert loader.windows == {"m": (3 * n - 1) // SEQ}
    assert next(loader)["input_ids"].shape == (2, SEQ)
    docs[-1] = np.array([5, 6, 7])  # the last document (number n: the empty one is 0) lacks EOD
    write_mmidx(tmp_path / "bad", docs, doc_idx=doc_idx)
    message = rf"bad.idx: 1 of {MAX_EOD_CHECKS} documents do not end with EOS id 0 \(first: document {n}\)"
    with pytest.raises(ManifestError, match=message):
        TokenLoader({"m": (str(tmp_path / "bad"), 1.0)}, SEQ, 2, eos_id=EOS)
