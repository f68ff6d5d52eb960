"""What tokenize may delete or overwrite in an output directory, and the checks before it writes."""

import json
import os

import pytest
from prep_helpers import Killed, die_after_shards, jsonl_source, tokenize_argv, tokenize_quietly, write_jsonl

import data_prep.shard_writer as shard_writer
from data_prep.output_dir import OutputDirError, exclusive
from data_prep.tokenize import main as tokenize_main


@pytest.fixture
def corpus(tmp_path):
    return write_jsonl(tmp_path / "in" / "corpus.jsonl", [f"document number {i} " * (5 + i) for i in range(30)])


SETTINGS = {"shard_tokens": 300, "validation_fraction": 0.2, "num_proc": 1, "chunk_docs": 8}


def run(corpus, tok, out, **kw):
    return tokenize_quietly(jsonl_source(corpus), tok, out, corpus.parent / "hf_cache", **{**SETTINGS, **kw})


def contents(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir()}


@pytest.mark.parametrize("overwrite", [False, True])
def test_unrecorded_shards_are_never_deleted(tok, corpus, tmp_path, overwrite):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train_00000.bin").write_bytes(b"someone else's tokens")
    (out / "validation_00003.bin").write_bytes(b"more")
    with pytest.raises(
        OutputDirError,
        match=r"out: holds shard files that no manifest or journal of "
        r"data_prep.tokenize records: train_00000.bin, validation_00003.bin; "
        r"they are never deleted",
    ):
        run(corpus, tok, out, overwrite=overwrite)
    assert contents(out) == {"train_00000.bin": b"someone else's tokens", "validation_00003.bin": b"more"}


def test_overwrite_deletes_only_recorded_files(tok, corpus, tmp_path):
    out = tmp_path / "out"
    first = run(corpus, tok, out)
    old_shards = {s.file for split in first.splits.values() for s in split.shards}
    mine = {
        "train_notes.bin": b"a",
        "validation_final.bin": b"b",
        "train_1.bin": b"c",
        "notes.txt": b"d",
        ".train_00000.bin.tmp": b"e",
        ".data.txt.77.tmp": b"f",
    }
    for name, data in mine.items():
        (out / name).write_bytes(data)
    (out / ".train_00001.bin.4242.tmp").write_bytes(b"a killed write of this tool")
    second = run(corpus, tok, out, overwrite=True, shard_tokens=5000)  # fewer, larger shards
    new_shards = {s.file for split in second.splits.values() for s in split.shards}
    assert len(new_shards) < len(old_shards)
    assert set(os.listdir(out)) == new_shards | set(mine) | {"manifest.json"}  # the old extra shards are gone
    assert all((out / name).read_bytes() == data for name, data in mine.items())


def test_overwrite_with_an_unreadable_manifest_keeps_its_shards(tok, corpus, tmp_path):
    out = tmp_path / "out"
    run(corpus, tok, out)
    (out / "manifest.json").write_text("{ edited by hand, badly")
    before = contents(out)
    with pytest.raises(
        OutputDirError,
        match=r"no manifest or journal .* records \(its manifest.json is unreadable\): "
        r"train_00000.bin, ",
    ):
        run(corpus, tok, out, overwrite=True)
    assert contents(out) == before


def test_overwrite_with_a_hand_edited_manifest_deletes_the_files_it_lists(tok, corpus, tmp_path):
    out = tmp_path / "out"
    run(corpus, tok, out, shard_tokens=300)
    raw = json.loads((out / "manifest.json").read_text())
    raw["splits"]["train"]["tokens"] += 1  # invalid for the loader, still names its files
    raw["splits"]["train"]["shards"].append({"file": "notes.txt", "tokens": 1, "documents": 0, "sha256": "0" * 64})
    (out / "manifest.json").write_text(json.dumps(raw))
    (out / "notes.txt").write_text("listed, but not a file this tool writes")
    m = run(corpus, tok, out, overwrite=True, shard_tokens=5000)
    shards = {s.file for sp in m.splits.values() for s in sp.shards}
    assert set(os.listdir(out)) == {"manifest.json", "notes.txt"} | shards


def test_resume_refuses_an_unrecorded_shard(tok, corpus, tmp_path, monkeypatch):
    out = tmp_path / "out"
    written = die_after_shards(monkeypatch, 2)
    with pytest.raises(Killed):
        run(corpus, tok, out)
    monkeypatch.undo()
    stranger = "validation_00007.bin" if "validation_00007.bin" not in written else "train_00042.bin"
    (out / stranger).write_bytes(b"not from this run")
    with pytest.raises(OutputDirError, match=f"records: {stranger};"):
        run(corpus, tok, out)
    assert (out / stranger).read_bytes() == b"not from this run" and all((out / f).exists() for f in written)


def test_shard_is_journaled_before_it_appears(tok, corpus, tmp_path, monkeypatch):
    """A kill between a shard's rename and its journal line would leave a shard no record lists."""
    out = tmp_path / "out"
    seen = []
    real_append = shard_writer.Journal.append

    def append(self, record):
        seen.append((record["file"], (out / record["file"]).exists()))
        real_append(self, record)

    monkeypatch.setattr(shard_writer.Journal, "append", append)
    m = run(corpus, tok, out)
    assert sorted(f for f, _ in seen) == sorted(s.file for sp in m.splits.values() for s in sp.shards)
    assert not any(existed for _, existed in seen)


def test_output_under_a_file_fails_before_any_work(tok, corpus, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputDirError, match=r"afile/sub: cannot be created: .*afile is a file"):
        run(corpus, tok, tmp_path / "afile" / "sub")
    with pytest.raises(OutputDirError, match=r"afile: is not a directory"):
        run(corpus, tok, tmp_path / "afile")
    with pytest.raises(SystemExit, match=r"^error: .*afile/corpus: cannot be created: .*afile is a file$"):
        tokenize_main(tokenize_argv(tok, tmp_path / "afile", corpus))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_fails_before_any_work(tok, corpus, tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(OutputDirError, match=r"ro/out: .*ro is not writable"):
        run(corpus, tok, tmp_path / "ro" / "out")


def test_every_output_is_checked_before_the_first_source_runs(tok, corpus, tmp_path):
    (tmp_path / "out" / "b").mkdir(parents=True)
    (tmp_path / "out" / "b" / "train_00000.bin").write_bytes(b"x")
    with pytest.raises(SystemExit, match=r"out/b: holds shard files"):
        tokenize_main(
            tokenize_argv(tok, tmp_path / "out", f"a={corpus}", f"b={corpus}", num_proc=1, cache_dir=tmp_path / "c")
        )
    assert not (tmp_path / "out" / "a").exists()


def test_failed_runs_leave_no_empty_directories(tok, corpus, tmp_path, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: not valid JSON"):
        tokenize_main(tokenize_argv(tok, tmp_path / "root" / "deeper", bad, cache_dir=tmp_path / "c"))
    assert not (tmp_path / "root").exists()
    die_after_shards(monkeypatch, 0)  # fails while tokenizing, before its first shard
    with pytest.raises(Killed):
        run(corpus, tok, tmp_path / "root" / "out")
    assert not (tmp_path / "root").exists()
    monkeypatch.undo()
    written = die_after_shards(monkeypatch, 1)  # fails after one shard: it and the journal stay, to resume from
    with pytest.raises(Killed):
        run(corpus, tok, tmp_path / "root" / "out")
    assert {p.name for p in (tmp_path / "root" / "out").iterdir()} == {"progress.jsonl", *written}


def test_a_second_writer_is_refused(tok, corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with exclusive(out):
        with pytest.raises(OutputDirError, match=r"out: another data_prep.tokenize is writing here"):
            run(corpus, tok, out)
    assert os.listdir(out) == []
    run(corpus, tok, out)  # the lock went with its holder
