import json
import os

import numpy as np
import pytest
from prep_helpers import (
    Killed,
    corpus_texts,
    die_after_shards,
    jsonl_source,
    read_split_docs,
    tokenize_argv,
    tokenize_quietly,
    write_jsonl,
)

import data_prep.shard_writer as shard_writer
import data_prep.tokenize as tokenize_mod
from data_prep.doc_split import validation_mask
from retnet_train.data import TokenLoader, read_manifest, verify_shards
from retnet_train.data.manifest import sha256_file

SHARD = 4000  # small: the corpus spans several shards and documents straddle shard edges
FRACTION = 0.2


@pytest.fixture
def corpus(tmp_path):
    return write_jsonl(tmp_path / "in" / "corpus.jsonl", corpus_texts())


SETTINGS = {"validation_fraction": FRACTION, "seed": 3, "shard_tokens": SHARD, "num_proc": 1, "chunk_docs": 7}


def run(source_path, tok, out, **kw):
    return tokenize_quietly(jsonl_source(source_path), tok, out, out.parent / "hf_cache", **{**SETTINGS, **kw})


def shard_digests(manifest):
    return {
        name: [(s.file, s.tokens, s.documents, s.sha256) for s in split.shards]
        for name, split in manifest.splits.items()
    }


def test_round_trip_decode_equals_input(tok, corpus, tmp_path):
    manifest = run(corpus, tok, tmp_path / "out")
    texts = corpus_texts()
    in_val = validation_mask(np.arange(len(texts)), FRACTION, 3)
    for split, member in (("train", ~in_val), ("validation", in_val)):
        expected = [t for t, m in zip(texts, member) if m and t]  # empty texts are not documents
        docs = read_split_docs(tmp_path / "out", split, tok.eos_id)
        assert [tok.processor.decode(d[:-1].tolist()) for d in docs] == expected
        assert manifest.split(split).documents == len(expected)
    assert 0 < manifest.split("validation").documents < manifest.split("train").documents


def test_a_validation_fraction_that_selects_no_document_is_warned_of(tok, corpus, tmp_path, capsys):
    """The run goes on (train is all there is), but says that the validation split it was asked for is
    empty: training would find no validation data only hours later."""
    manifest = run(corpus, tok, tmp_path / "none", validation_fraction=1e-12)
    assert capsys.readouterr().out == "warning: corpus: validation fraction 1e-12 selected no documents\n"
    assert manifest.split("train").documents == sum(1 for t in corpus_texts() if t)
    run(corpus, tok, tmp_path / "some")  # FRACTION selects some: nothing to warn of
    assert "warning" not in capsys.readouterr().out


def test_manifest_and_shard_files(tok, corpus, tmp_path):
    m = run(corpus, tok, tmp_path / "out")
    on_disk = read_manifest(tmp_path / "out")
    assert shard_digests(on_disk) == shard_digests(m)
    assert (m.vocab_size, m.eos_id, m.tokenizer_sha256, m.dtype) == (1000, 2, tok.sha256, "uint16")
    raw = json.loads(m.path.read_text())
    assert raw["format_version"] == 1 and raw["split_rule"] == {
        "validation_fraction": FRACTION,
        "seed": 3,
        "unit": "document",
    }
    train = m.split("train").shards
    assert len(train) >= 3
    assert all(s.tokens == SHARD for s in train[:-1]) and 0 < train[-1].tokens <= SHARD
    for split in m.splits.values():
        for s in split.shards:
            path = tmp_path / "out" / s.file
            assert path.stat().st_size == 2 * s.tokens
            assert sha256_file(path) == s.sha256
            assert np.count_nonzero(np.fromfile(path, np.uint16) == tok.eos_id) == s.documents
    assert verify_shards(m) == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["manifest.json"] + [s.file for sp in m.splits.values() for s in sp.shards]
    )  # no journal/tmp left


def test_same_shards_for_num_proc_1_and_2(tok, corpus, tmp_path):
    one = run(corpus, tok, tmp_path / "p1", num_proc=1, chunk_docs=1000)
    two = run(corpus, tok, tmp_path / "p2", num_proc=2, chunk_docs=1000, batch_size=3)
    assert shard_digests(one) == shard_digests(two)
    assert shard_digests(one) == shard_digests(run(corpus, tok, tmp_path / "p3"))  # and other chunking


def test_bos_option(tok, corpus, tmp_path):
    m = run(corpus, tok, tmp_path / "out", add_bos=True)
    texts = corpus_texts()
    in_val = validation_mask(np.arange(len(texts)), FRACTION, 3)
    for split, member in (("train", ~in_val), ("validation", in_val)):
        docs = read_split_docs(tmp_path / "out", split, tok.eos_id)
        assert docs and all(d[0] == tok.bos_id and d[-1] == tok.eos_id for d in docs), split
        # BOS is added before each document, not written over its first token: the rest decodes to the text
        expected = [t for t, keep in zip(texts, member) if keep and t]
        assert [tok.processor.decode(d[1:-1].tolist()) for d in docs] == expected, split
        assert all(tok.bos_id not in d[1:] for d in docs), split
    assert json.loads(m.path.read_text())["add_bos"] is True


@pytest.mark.parametrize("kill_after", [1, 3, 7])
def test_resume_after_kill_keeps_verified_shards(tok, corpus, tmp_path, monkeypatch, kill_after):
    reference = shard_digests(run(corpus, tok, tmp_path / "ref"))
    out = tmp_path / "out"
    real_write = shard_writer.SplitShardWriter._write_shard
    written = []

    def dying_write(self, n):
        if len(written) == kill_after:
            # die half-way through the 4th shard: a temporary file is all that is left of it
            (out / f".{self.split}_{len(self.shards):05d}.bin.999.tmp").write_bytes(b"partial")
            raise Killed
        real_write(self, n)
        written.append(self.shards[-1].file)

    monkeypatch.setattr(shard_writer.SplitShardWriter, "_write_shard", dying_write)
    with pytest.raises(Killed):
        run(corpus, tok, out)
    assert not (out / "manifest.json").exists() and (out / "progress.jsonl").exists()
    kept = {f: os.stat(out / f) for f in written}
    records = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()[1:]]
    resume = {
        split: max([r["resume"][0] for r in records if r["split"] == split], default=0)
        for split in ("train", "validation")
    }
    in_val = validation_mask(np.arange(len(corpus_texts())), FRACTION, 3)
    must_redo = sum(i >= resume["validation" if v else "train"] for i, v in enumerate(in_val))
    monkeypatch.setattr(shard_writer.SplitShardWriter, "_write_shard", real_write)

    encoded = []  # documents tokenized by the second run (num_proc=1 maps in this process)
    real_call = tokenize_mod._Encoder.__call__
    monkeypatch.setattr(
        tokenize_mod._Encoder,
        "__call__",
        lambda self, batch: encoded.append(len(batch["text"])) or real_call(self, batch),
    )
    m = run(corpus, tok, out)
    assert shard_digests(m) == reference
    for f, st in kept.items():  # finished shards were kept, not rewritten
        now = os.stat(out / f)
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    # only documents not yet on disk were tokenized again (the one cut by the last kept shard included)
    assert sum(encoded) == must_redo < len(corpus_texts())
    assert not list(out.glob(".*.tmp")) and not (out / "progress.jsonl").exists()


def test_resume_regenerates_a_damaged_kept_shard(tok, corpus, tmp_path, monkeypatch):
    reference = shard_digests(run(corpus, tok, tmp_path / "ref"))
    out = tmp_path / "out"
    die_after_shards(monkeypatch, 4)
    with pytest.raises(Killed):
        run(corpus, tok, out)
    monkeypatch.undo()
    victim = out / "train_00001.bin"
    data = bytearray(victim.read_bytes())
    data[10] ^= 1
    victim.write_bytes(bytes(data))
    assert shard_digests(run(corpus, tok, out)) == reference


def test_existing_output_is_never_overwritten_without_flag(tok, corpus, tmp_path):
    out = tmp_path / "out"
    first = run(corpus, tok, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match=rf"{out}/manifest.json: output already exists; pass --overwrite"):
        run(corpus, tok, out, seed=4)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (out / "notes.txt").write_text("mine")
    second = run(corpus, tok, out, seed=4, overwrite=True)
    assert shard_digests(second) != shard_digests(first)  # another split seed -> other shards
    assert (out / "notes.txt").read_text() == "mine"  # only the tool's own files were replaced


def test_unfinished_run_with_other_settings_is_not_resumed(tok, corpus, tmp_path, monkeypatch):
    out = tmp_path / "out"
    die_after_shards(monkeypatch, 1)
    with pytest.raises(Killed):
        run(corpus, tok, out)
    monkeypatch.undo()
    with pytest.raises(FileExistsError, match=r"progress.jsonl: an unfinished run with different inputs or settings"):
        run(corpus, tok, out, shard_tokens=SHARD * 2)
    m = run(corpus, tok, out, shard_tokens=SHARD * 2, overwrite=True)  # discards that run's recorded shards
    assert sorted(os.listdir(out)) == sorted(
        ["manifest.json"] + [s.file for sp in m.splits.values() for s in sp.shards]
    )


def test_loader_reads_tokenized_shards(tok, corpus, tmp_path):
    m = run(corpus, tok, tmp_path / "out")
    loader = TokenLoader(
        {"c": (str(tmp_path / "out"), 1.0)}, 64, 4, tokenizer_sha256=tok.sha256, vocab_size=1000, verify_checksums=True
    )
    batch = next(loader)
    ids = batch["input_ids"].numpy()
    stream = np.concatenate([np.fromfile(p, np.uint16) for p in m.shard_paths("train")]).astype(np.int64)
    for row in ids:  # every row is a stride-aligned window of the train stream
        starts = [s for s in range(0, len(stream) - 64, 64) if np.array_equal(stream[s : s + 64], row)]
        assert starts
    assert batch["doc_starts"].numpy()[:, 1:].tolist() == (ids[:, :-1] == tok.eos_id).tolist()


KILL_SCRIPT = """
import os, signal, sys
import data_prep.shard_writer as sw
from data_prep.sources import parse_source
from data_prep.tokenize import tokenize_source
real, done = sw.SplitShardWriter._write_shard, []
def write_then_die(self, n):
    if len(done) == 4:
        os.kill(os.getpid(), signal.SIGKILL)  # no finally blocks, no cleanup: a real crash
    real(self, n)
    done.append(1)
sw.SplitShardWriter._write_shard = write_then_die
corpus, tok, out, cache = sys.argv[1:]
tokenize_source(parse_source("corpus=" + corpus), tok, out, validation_fraction=0.2, seed=3, shard_tokens=4000,
                num_proc=1, chunk_docs=7, progress=False, cache_dir=cache)
"""


def test_resume_after_sigkill(tok, corpus, tmp_path):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    reference = shard_digests(run(corpus, tok, tmp_path / "ref"))
    out = tmp_path / "out"
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(corpus), str(tok.path), str(out), str(tmp_path / "hf_cache")],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (out / "manifest.json").exists()
    assert len((out / "progress.jsonl").read_text().splitlines()) == 1 + 4  # header + 4 finished shards
    assert shard_digests(run(corpus, tok, out)) == reference


def test_resumed_run_says_so_and_from_where(tok, corpus, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    die_after_shards(monkeypatch, 2)  # two train shards; validation has none yet, so it restarts at document 0
    with pytest.raises(Killed):
        run(corpus, tok, out)
    monkeypatch.undo()
    records = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()[1:]]
    assert {r["split"] for r in records} == {"train"}
    (out / records[-1]["file"]).write_bytes(b"damaged")
    capsys.readouterr()
    run(corpus, tok, out)
    train_at = records[0]["resume"][0]  # the damaged second shard is redone
    assert (
        f"{out}: resuming an unfinished run at document 0 of {len(corpus_texts())} (train continues at document "
        f"{train_at}, validation at 0); kept 1 verified shards, redoing 1 ({records[-1]['file']})"
    ) in capsys.readouterr().out
    capsys.readouterr()
    run(corpus, tok, tmp_path / "fresh")
    assert "resuming" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "error, code, message",
    [
        (KeyboardInterrupt, 130, "interrupted: run the same command again to resume"),
        (
            OSError(28, "No space left on device", "x/.train_00002.bin.1.tmp"),
            1,
            "error: [Errno 28] No space left on device: 'x/.train_00002.bin.1.tmp'",
        ),
    ],
)
def test_cli_interrupted_or_failing_write_is_one_line_and_resumable(
    tok, corpus, tmp_path, monkeypatch, capsys, error, code, message
):
    options = {"num_proc": 1, "shard_tokens": SHARD, "chunk_docs": 7, "cache_dir": tmp_path / "hf_cache"}
    args = tokenize_argv(tok, tmp_path / "out", f"c={corpus}", **options)
    die_after_shards(monkeypatch, 2, error)
    raised = None
    try:
        tokenize_mod.main(args)
    except BaseException as e:  # a KeyboardInterrupt that got through must fail this test, not stop pytest
        raised = e
    assert isinstance(raised, SystemExit)
    assert raised.code == (code if code != 1 else message)  # SystemExit(message) exits with status 1
    if code == 130:
        assert capsys.readouterr().err.strip().splitlines()[-1] == message
    monkeypatch.undo()
    tokenize_mod.main(args)
    assert "resuming an unfinished run" in capsys.readouterr().out


def test_cli_run_stopped_in_a_later_source_resumes_keeping_the_finished_ones(
    tok, corpus, tmp_path, monkeypatch, capsys
):
    (tmp_path / "code").mkdir()
    for i in range(5):
        (tmp_path / "code" / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n")
    options = {"num_proc": 1, "shard_tokens": SHARD, "chunk_docs": 7, "cache_dir": tmp_path / "hf_cache"}
    args = tokenize_argv(tok, tmp_path / "out", f"a={corpus}", f"b={tmp_path}/code", **options)
    real = tokenize_mod.tokenize_source

    def stop_in_b(source, *a, **kw):
        if source.name == "b":
            raise KeyboardInterrupt
        return real(source, *a, **kw)

    monkeypatch.setattr(tokenize_mod, "tokenize_source", stop_in_b)
    with pytest.raises(SystemExit) as stopped:
        tokenize_mod.main(args)
    assert stopped.value.code == 130  # "interrupted: run the same command again to resume"
    monkeypatch.undo()
    a_dir = tmp_path / "out" / "a"
    before = {p.name: (p.stat().st_ino, p.read_bytes()) for p in a_dir.iterdir()}
    capsys.readouterr()
    tokenize_mod.main(args)  # the same command: a is kept as it is, b is made
    assert f"{a_dir}: already finished with these inputs and settings; kept" in capsys.readouterr().out
    assert {p.name: (p.stat().st_ino, p.read_bytes()) for p in a_dir.iterdir()} == before
    assert (
        read_manifest(tmp_path / "out" / "b").split("train").documents
        + read_manifest(tmp_path / "out" / "b").split("validation").documents
        == 5
    )
    tokenize_mod.main(args)  # finished as a whole: a no-op
    with pytest.raises(SystemExit, match=rf"{a_dir}/manifest.json: output already exists"):
        tokenize_mod.main(args + ["--seed", "1"])  # other settings: refused, as before
    (a_dir / read_manifest(a_dir).split("train").shards[0].file).write_bytes(b"x")
    with pytest.raises(SystemExit, match=r"a/manifest.json: finished output .* has damaged shards"):
        tokenize_mod.main(args)


def test_empty_texts_count_in_neither_split():
    """Only non-empty texts are documents: where every one of them falls into validation, the source is
    refused even when empty texts would have landed in train."""
    import datasets

    texts = ["", "alpha", "", "beta", "", "gamma", ""] * 3
    fraction, seed = 0.5, 0
    in_val = validation_mask(np.arange(len(texts)), fraction, seed)
    nonempty = np.array([bool(t) for t in texts])
    counts = tokenize_mod._split_documents(datasets.Dataset.from_dict({"text": texts}), fraction, seed)
    assert counts == {
        "train": int(np.count_nonzero(nonempty & ~in_val)),
        "validation": int(np.count_nonzero(nonempty & in_val)),
    }
    assert sum(counts.values()) == 9
