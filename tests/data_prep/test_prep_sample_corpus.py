"""`make data`: tokenizer + shards from the standard library's sources, then quick reuse."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from prep_helpers import read_split_docs

from data_prep.doc_split import validation_mask
from data_prep.sample_corpus import VOCAB_SIZE, stdlib_source_files
from data_prep.tokenizer_card import load_tokenizer
from retnet_train.data import TokenLoader, build_validation_loader, read_manifest, verify_shards
from retnet_train.data.manifest import sha256_file

REPO = Path(__file__).resolve().parents[2]
MAX_BYTES = "2000000"  # a slice of the default corpus: same code path, a few seconds


def build(out, *extra):
    return subprocess.run(
        [sys.executable, "-m", "data_prep.sample_corpus", "--out", str(out), "--max-bytes", MAX_BYTES, *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
    )


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    result = build(out)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def test_corpus_is_sorted_utf8_and_capped():
    files = stdlib_source_files(int(MAX_BYTES))
    assert files == sorted(files) and all(f.suffix == ".py" for f in files)
    assert sum(f.stat().st_size for f in files) <= int(MAX_BYTES)
    for f in files:
        f.read_text(encoding="utf-8")


def test_corpus_skips_installed_packages_bad_and_empty_files_and_stops_at_the_cap(tmp_path, monkeypatch):
    """What a corpus is made of, on a stdlib tree of known files: sorted .py files that are UTF-8 and not
    empty, none from site-packages or dist-packages (a Python built from source installs packages under its
    stdlib path: the corpus would depend on them), taken in order until the next would pass max_bytes."""
    import data_prep.sample_corpus as sample_corpus

    files = {
        "a.py": b"x = 1\n" * 20,
        "b/c.py": b"y = 2\n" * 20,
        "bad.py": b"z = '\xff'\n",  # not UTF-8
        "dist-packages/d.py": b"d = 1\n",
        "empty.py": b"",
        "lib/site-packages/s.py": b"s = 1\n",
        "m.py": b"m = 3\n" * 100,  # does not fit: the corpus stops here
        "n.py": b"n = 4\n",  # would fit, but comes after
        "notes.txt": b"not python\n",
    }
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    monkeypatch.setattr(sample_corpus.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    assert stdlib_source_files(500) == [tmp_path / "a.py", tmp_path / "b" / "c.py"]
    assert stdlib_source_files(10_000) == [tmp_path / n for n in ("a.py", "b/c.py", "m.py", "n.py")]


def test_outputs_match_the_tiny_preset(sample):
    card = json.loads((sample / "tokenizer.card.json").read_text())
    assert card["vocab_size"] == VOCAB_SIZE == 8192
    assert card["sha256"] == sha256_file(sample / "tokenizer.model")
    assert (card["bos_id"], card["eos_id"], card["pad_id"], card["unk_id"]) == (1, 2, 3, 0)
    manifest = read_manifest(sample / "shards")
    assert (manifest.vocab_size, manifest.eos_id, manifest.tokenizer_sha256) == (8192, 2, card["sha256"])
    assert manifest.split("train").tokens > 300_000 and manifest.split("validation").tokens > 1_000
    assert verify_shards(manifest) == []
    loader = TokenLoader(
        {"sample": (str(sample / "shards"), 1.0)}, 128, 4, tokenizer_sha256=card["sha256"], vocab_size=8192
    )
    assert next(loader)["input_ids"].max() < 8192
    assert len(build_validation_loader({"sample": (str(sample / "shards"), 1.0)}, 128, 4)) > 0


def test_shards_decode_to_the_stdlib_files_one_document_each(sample):
    """Token counts alone pass with files cut into lines, dropped, reordered or mangled: decode them."""
    tok = load_tokenizer(sample / "tokenizer.model")
    texts = [f.read_text(encoding="utf-8") for f in stdlib_source_files(int(MAX_BYTES))]
    in_val = validation_mask(np.arange(len(texts)), 0.02, 0)  # sample_corpus's split: fraction 0.02, seed 0
    for split, member in (("train", ~in_val), ("validation", in_val)):
        docs = read_split_docs(sample / "shards", split, tok.eos_id)
        expected = [t for t, keep in zip(texts, member) if keep]
        assert len(docs) == len(expected) == read_manifest(sample / "shards").split(split).documents, split
        assert [tok.processor.decode(d[:-1].tolist()) for d in docs] == expected, split


def test_rerun_reuses_without_rebuilding(sample):
    before = {p: p.stat().st_mtime_ns for p in sample.rglob("*") if p.is_file()}
    result = build(sample)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "reusing tokenizer" in result.stdout and "reusing verified shards" in result.stdout
    assert {p: p.stat().st_mtime_ns for p in sample.rglob("*") if p.is_file()} == before


def test_damaged_sample_is_reported_not_replaced(sample, tmp_path):
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(sample), str(copy)], check=True)
    shard = copy / "shards" / "train_00000.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    result = build(copy)
    assert result.returncode != 0
    assert "train_00000.bin: sha256" in result.stderr and "--overwrite" in result.stderr
    assert shard.read_bytes() == bytes(data)  # left as is for inspection


def test_out_under_a_file_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    result = build(tmp_path / "afile" / "sample")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path}/afile/sample: cannot be created: {tmp_path}/afile is a file"
    ]
