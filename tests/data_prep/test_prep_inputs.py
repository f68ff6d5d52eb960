"""Input sources (files, globs, directories, datasets) and the bad-input errors."""

import gzip
import json

import datasets
import numpy as np
import pytest
from prep_helpers import read_split_docs, tokenize_argv, tokenize_quietly, write_jsonl

from data_prep.doc_split import validation_mask
from data_prep.sources import SourceError, load_source, parse_source
from data_prep.tokenize import build_parser as tokenize_parser
from data_prep.tokenize import main as tokenize_main
from retnet_train.data import read_manifest


def texts_of(source, tmp_path):
    return load_source(source, cache_dir=str(tmp_path / "cache"))["text"]


def test_text_files_one_document_each_sorted(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "b.txt").write_text("second\nfile\n")
    (d / "a.txt").write_text("first file")
    (d / "sub").mkdir()
    (d / "sub" / "c.md").write_text("third ✓")
    assert texts_of(parse_source(f"x={d}"), tmp_path) == ["first file", "second\nfile\n", "third ✓"]
    assert texts_of(parse_source(f"x={d}/*.txt"), tmp_path) == ["first file", "second\nfile\n"]
    lines = texts_of(parse_source(f"x={d}/b.txt", text_unit="line"), tmp_path)
    assert lines == ["second", "file"]


def test_directory_leaves_out_hidden_files_and_folders(tmp_path):
    d = tmp_path / ".corpus"  # the given directory itself may be hidden
    (d / ".git" / "objects").mkdir(parents=True)
    (d / ".git" / "objects" / "ab12").write_text("git object")
    (d / "sub" / ".cache").mkdir(parents=True)
    (d / "sub" / ".cache" / "c.txt").write_text("cached copy")
    (d / ".env").write_text("SECRET=1")
    (d / "a.txt").write_text("first")
    (d / "sub" / "b.txt").write_text("second")
    source = parse_source(f"x={d}")
    assert source.files == [d / "a.txt", d / "sub" / "b.txt"]
    assert texts_of(source, tmp_path) == ["first", "second"]
    (d / "a.txt").unlink()
    (d / "sub" / "b.txt").unlink()
    with pytest.raises(SourceError, match=r"\.corpus: directory contains no files \(hidden ones"):
        parse_source(f"x={d}")


def test_plain_text_line_endings_become_lf_json_texts_are_kept(tmp_path):
    (tmp_path / "dos.txt").write_bytes(b"one\r\ntwo\r\n\r\nold mac\rend")
    assert texts_of(parse_source(str(tmp_path / "dos.txt")), tmp_path) == ["one\ntwo\n\nold mac\nend"]
    paragraphs = texts_of(parse_source(str(tmp_path / "dos.txt"), text_unit="paragraph"), tmp_path)
    assert paragraphs == ["one\ntwo", "old mac\nend"]
    write_jsonl(tmp_path / "dos.jsonl", ["one\r\ntwo"])
    assert texts_of(parse_source(str(tmp_path / "dos.jsonl")), tmp_path) == ["one\r\ntwo"]


def test_jsonl_gz_parquet_and_field_name(tmp_path):
    rows = [{"body": "alpha"}, {"body": "beta"}]
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    assert texts_of(parse_source(str(tmp_path / "c.jsonl.gz"), text_field="body"), tmp_path) == ["alpha", "beta"]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p" / "c.parquet"))
    assert texts_of(parse_source(str(tmp_path / "p" / "c.parquet"), text_field="body"), tmp_path) == ["alpha", "beta"]
    with pytest.raises(SourceError, match=r"c.jsonl.gz:1: no field 'text' \(fields: \['body'\]; --text-field names"):
        parse_source(str(tmp_path / "c.jsonl.gz"))
    with pytest.raises(SourceError, match=r"no text field 'text'; columns are \['body'\]"):
        texts_of(parse_source(str(tmp_path / "p" / "c.parquet")), tmp_path)


def test_datasets_sources(tmp_path):
    ds = datasets.Dataset.from_dict({"content": ["one", "two", "three"], "n": [1, 2, 3]})
    ds.save_to_disk(str(tmp_path / "saved"))
    assert texts_of(parse_source(f"s=disk:{tmp_path / 'saved'}", text_field="content"), tmp_path) == [
        "one",
        "two",
        "three",
    ]
    # any datasets.load_dataset spec; here a local parquet directory (no network in tests)
    (tmp_path / "hub").mkdir()
    ds.to_parquet(str(tmp_path / "hub" / "train.parquet"))
    src = parse_source(f"h=hf:{tmp_path / 'hub'}@train", text_field="content")
    assert src.name == "h"
    assert texts_of(src, tmp_path) == ["one", "two", "three"]


def test_a_glob_names_the_directories_it_leaves_out(tmp_path, capsys):
    """A glob reads the files it matches; the directories it matches are said, never silently dropped."""
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    (tmp_path / "corpus" / "sub" / "b.txt").write_text("below\n")
    with pytest.raises(
        SourceError,
        match=r"corpus/\*: glob matches 1 directories and no files \(.*corpus/\*/\*\* reads the files below them",
    ):
        parse_source(str(tmp_path / "corpus" / "*"))
    (tmp_path / "corpus" / "a.txt").write_text("top\n")
    assert parse_source(str(tmp_path / "corpus" / "*")).files == [tmp_path / "corpus" / "a.txt"]
    assert f"warning: {tmp_path}/corpus/*: glob also matches 1 directories, whose files are left out" in (
        capsys.readouterr().out
    )
    assert len(parse_source(str(tmp_path / "corpus" / "**")).files) == 2


def test_missing_inputs_name_the_path(tmp_path):
    with pytest.raises(SourceError, match=rf"{tmp_path}/nope.jsonl: no such file or directory"):
        parse_source(str(tmp_path / "nope.jsonl"))
    with pytest.raises(SourceError, match=r"\*.jsonl: glob matches no files"):
        parse_source(str(tmp_path / "*.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=r"empty: directory contains no files"):
        parse_source(str(tmp_path / "empty"))
    with pytest.raises(SourceError, match="no such dataset directory"):
        load_source(parse_source(f"disk:{tmp_path / 'none'}"))
    with pytest.raises(SourceError, match=rf"'none' \(hf:{tmp_path}/none\): datasets.load_dataset failed"):
        load_source(parse_source(f"hf:{tmp_path / 'none'}"), cache_dir=str(tmp_path / "c"))


def test_undecodable_bytes_name_file_and_offset(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"fine text\n" * 3 + b"caf\xe9\n")
    with pytest.raises(SourceError, match=r"bad.txt: not valid UTF-8 at byte 33"):
        load_source(parse_source(str(tmp_path / "bad.txt")))


def test_mixed_file_types_refused(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    write_jsonl(tmp_path / "b.jsonl", ["b"])
    with pytest.raises(SourceError, match=r"mixes file types \['json', 'text'\]"):
        load_source(parse_source(str(tmp_path)), cache_dir=str(tmp_path / "c"))


def test_empty_corpora(tok, tmp_path):
    (tmp_path / "zero.jsonl").write_text("")
    with pytest.raises(SourceError, match=r"'zero'.*zero.jsonl\): empty corpus \(all 1 files are empty\)"):
        tokenize_quietly(parse_source(str(tmp_path / "zero.jsonl")), tok, tmp_path / "o1", tmp_path / "c")
    write_jsonl(tmp_path / "blank.jsonl", ["", "", ""])
    with pytest.raises(SourceError, match=r"'blank'.*empty corpus \(no text in any document\)"):
        tokenize_quietly(parse_source(str(tmp_path / "blank.jsonl")), tok, tmp_path / "o2", tmp_path / "c")
    assert not (tmp_path / "o2" / "manifest.json").exists()
    (tmp_path / "null.jsonl").write_text('{"text": "a"}\n{"text": null}\n')
    with pytest.raises(SourceError, match=r"null.jsonl:2: field 'text' is null, expected a string"):
        tokenize_quietly(parse_source(str(tmp_path / "null.jsonl")), tok, tmp_path / "o3", tmp_path / "c")


def decoded_splits(tok, directory):
    """Each split of a tokenized source, its documents decoded, in order: what the source's shards hold."""
    return {
        split: [tok.processor.decode(d[:-1].tolist()) for d in read_split_docs(directory, split, tok.eos_id)]
        for split in ("train", "validation")
    }


def expected_splits(texts, fraction, seed=0):
    in_val = validation_mask(np.arange(len(texts)), fraction, seed)
    return {
        "train": [t for t, v in zip(texts, in_val) if not v],
        "validation": [t for t, v in zip(texts, in_val) if v],
    }


def test_cli_several_named_sources(tok, tmp_path, capsys):
    web_texts = [f"web page {i} " * 20 for i in range(40)]
    code_texts = [f"def f{i}(x):\n    return x * {i}\n" for i in range(5)]
    write_jsonl(tmp_path / "web.jsonl", web_texts)
    (tmp_path / "code").mkdir()
    for i, text in enumerate(code_texts):
        (tmp_path / "code" / f"m{i}.py").write_text(text)
    sources = (f"web={tmp_path}/web.jsonl", f"code={tmp_path}/code")
    tokenize_main(
        tokenize_argv(tok, tmp_path / "out", *sources, validation_fraction=0.1, num_proc=2, cache_dir=tmp_path / "c")
    )
    web, code = read_manifest(tmp_path / "out" / "web"), read_manifest(tmp_path / "out" / "code")
    assert web.split("train").documents + web.split("validation").documents == 40
    assert code.split("train").documents + code.split("validation").documents == 5
    # each source's shards hold its own texts, token for token (not just as many documents)
    assert decoded_splits(tok, tmp_path / "out" / "web") == expected_splits(web_texts, 0.1)
    assert decoded_splits(tok, tmp_path / "out" / "code") == expected_splits(code_texts, 0.1)  # files in name order
    assert web.tokenizer_sha256 == code.tokenizer_sha256 == tok.sha256
    assert "web/manifest.json: train" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="output already exists"):  # a second run refuses, one line
        tokenize_main(tokenize_argv(tok, tmp_path / "out", f"web={tmp_path}/web.jsonl", cache_dir=tmp_path / "c"))
    with pytest.raises(SystemExit, match=r"source name '\.\.' in '\.\.=.*' is not a directory name"):
        tokenize_main(tokenize_argv(tok, tmp_path / "o", f"..={tmp_path}/web.jsonl"))
    with pytest.raises(SystemExit, match="source names must be unique"):
        tokenize_main(tokenize_argv(tok, tmp_path / "o", f"a={tmp_path}/web.jsonl", f"a={tmp_path}/code"))


OUT_OF_RANGE = [
    ({"seed": -1}, r"--seed must be in \[0, 2\*\*64\), got -1"),
    ({"seed": 2**64}, rf"--seed must be in \[0, 2\*\*64\), got {2**64}"),
    ({"validation_fraction": 1.5}, r"--validation-fraction must be in \[0, 1\), got 1.5"),
    ({"shard_tokens": 0}, r"--shard-tokens must be >= 1, got 0"),
    ({"chunk_docs": 0}, r"--chunk-docs must be >= 1, got 0"),
    ({"num_proc": 0}, r"--num-proc must be >= 1, got 0"),
    ({"num_proc": -2}, r"--num-proc must be >= 1, got -2"),
]


def test_every_numeric_flag_has_an_out_of_range_case():
    numeric = {a.option_strings[0] for a in tokenize_parser()._actions if a.type in (int, float)}
    assert numeric == {f"--{name.replace('_', '-')}" for option, _ in OUT_OF_RANGE for name in option}


@pytest.mark.parametrize("option, message", OUT_OF_RANGE)
def test_cli_setting_out_of_range_is_one_line_naming_the_flag(tok, tmp_path, option, message):
    write_jsonl(tmp_path / "web.jsonl", ["a page"])
    with pytest.raises(SystemExit, match=rf"^error: {message}$"):
        tokenize_main(tokenize_argv(tok, tmp_path / "o", f"{tmp_path}/web.jsonl", cache_dir=tmp_path / "c", **option))
    assert not (tmp_path / "o").exists()


JSON_FAULTS = [
    (
        '{"text": "a"}\n{"text": "broken\n{"text": "c"}\n',
        r"f.jsonl:2: not valid JSON \(Invalid control character at column 17\)",
    ),
    ('{"text": "a"} trailing\n', r"f.jsonl:1: not valid JSON \(Extra data at column 15\)"),
    ('{"text": "a"}\n\n[1, 2]\n', r"f.jsonl:3: a record must be a JSON object, got list"),
    ('{"text": "a"}\n{"text": 5}\n', r"f.jsonl:2: field 'text' is int, expected a string"),
    ('{"text": 5}\n{"text": 6}\n', r"f.jsonl:1: field 'text' is int, expected a string"),
    ('{"text": "a"}\n{"text": {"x": 1}}\n', r"f.jsonl:2: field 'text' is dict, expected a string"),
    ('{"text": ["a", "b"]}\n', r"f.jsonl:1: field 'text' is list, expected a string"),
    (
        '{"text": "a"}\n{"body": "b"}\n',
        r"f.jsonl:2: no field 'text' \(fields: \['body'\]; --text-field names the text field\)",
    ),
    ('[{"text": "a"}, {"text": null}]', r"f.jsonl: record 1: field 'text' is null, expected a string"),
]


@pytest.mark.parametrize("content, message", JSON_FAULTS)
def test_bad_json_record_names_file_and_line(tmp_path, content, message):
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "a.jsonl", ["fine"] * 3)  # a good file first: the fault is in the second
    (tmp_path / "d" / "f.jsonl").write_text(content)
    with pytest.raises(SourceError, match=rf"^{tmp_path}/d/{message}$"):
        load_source(parse_source(str(tmp_path / "d")), cache_dir=str(tmp_path / "c"))


def test_malformed_line_is_one_line_from_both_clis(tok, tmp_path, capsys):
    from data_prep.train_tokenizer import main as train_main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n' * 5 + '{"text": "broken\n' + '{"text": "b"}\n')
    expected = rf"^error: {bad}:6: not valid JSON \(Invalid control character at column 17\)$"
    with pytest.raises(SystemExit, match=expected):
        tokenize_main(tokenize_argv(tok, tmp_path / "out", bad, cache_dir=tmp_path / "c"))
    with pytest.raises(SystemExit, match=expected):
        train_main(["--source", str(bad), "--out", str(tmp_path / "t.model"), "--cache-dir", str(tmp_path / "c")])
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "t.model").exists()


def test_parquet_faults_name_the_file_or_row(tmp_path):
    (tmp_path / "bad").mkdir()
    datasets.Dataset.from_dict({"text": ["fine"]}).to_parquet(str(tmp_path / "bad" / "a.parquet"))
    (tmp_path / "bad" / "b.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(SourceError, match=r"bad/b.parquet: not a readable parquet file \(Parquet magic bytes"):
        load_source(parse_source(str(tmp_path / "bad")), cache_dir=str(tmp_path / "c"))
    datasets.Dataset.from_dict({"text": [1, 2]}).to_parquet(str(tmp_path / "ints.parquet"))
    with pytest.raises(SourceError, match=r"'ints'.*: text field 'text' has type int64, expected strings"):
        load_source(parse_source(str(tmp_path / "ints.parquet")), cache_dir=str(tmp_path / "c"))
    datasets.Dataset.from_dict({"text": ["a", None, None]}).to_parquet(str(tmp_path / "nulls.parquet"))
    with pytest.raises(SourceError, match=r"'nulls'.*: 2 documents have no text \(null 'text'; first: row 1\)"):
        load_source(parse_source(str(tmp_path / "nulls.parquet")), cache_dir=str(tmp_path / "c"))


def test_gzip_faults_are_decode_errors(tmp_path):
    with gzip.open(tmp_path / "ok.txt.gz", "wt") as f:
        f.write("compressed text\n")
    assert texts_of(parse_source(str(tmp_path / "ok.txt.gz")), tmp_path) == ["compressed text\n"]
    (tmp_path / "cut.jsonl.gz").write_bytes((tmp_path / "ok.txt.gz").read_bytes()[:15])
    with pytest.raises(SourceError, match=r"cut.jsonl.gz: not a valid gzip file \(.*\); pass --on-decode-error skip"):
        parse_source(str(tmp_path / "cut.jsonl.gz"))
    with gzip.open(tmp_path / "latin1.txt.gz", "wb") as f:
        f.write(b"caf\xe9\n")
    with pytest.raises(SourceError, match=r"latin1.txt.gz: not valid UTF-8 at byte 3"):
        parse_source(str(tmp_path / "latin1.txt.gz"))


def test_disk_source_that_is_not_a_saved_dataset(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(SourceError, match=r"plain: not a dataset saved with save_to_disk \(source 'x'\)"):
        load_source(parse_source(f"x=disk:{tmp_path / 'plain'}"))


@pytest.fixture
def mixed_dir(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text("first document " * 20)
    (d / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (d / "c.txt").write_bytes("latin-1 café".encode("latin-1"))
    (d / "d.txt").write_text("second document " * 20)
    return d


def test_undecodable_files_stop_the_run_by_default(tok, mixed_dir, tmp_path):
    with pytest.raises(
        SystemExit,
        match=rf"^error: {mixed_dir}/b.png: not valid UTF-8 at byte 0 "
        r"\(invalid start byte\); pass --on-decode-error skip to leave such files out$",
    ):
        tokenize_main(tokenize_argv(tok, tmp_path / "out", f"m={mixed_dir}"))
    assert not (tmp_path / "out").exists()


def test_undecodable_files_skipped_are_counted_in_the_manifest(tok, mixed_dir, tmp_path, capsys):
    options = {"on_decode_error": "skip", "validation_fraction": 0, "num_proc": 1, "cache_dir": tmp_path / "c"}
    tokenize_main(tokenize_argv(tok, tmp_path / "out", f"m={mixed_dir}", **options))
    out = capsys.readouterr().out
    assert (
        f"warning: source 'm': skipped 2 files that are not valid UTF-8 text (--on-decode-error skip; the "
        f"manifest lists them): {mixed_dir}/b.png, {mixed_dir}/c.txt" in out
    )
    m = read_manifest(tmp_path / "out" / "m")
    assert m.split("train").documents == 2
    assert [f["path"] for f in m.extra["source"]["files"]] == [str(mixed_dir / "a.txt"), str(mixed_dir / "d.txt")]
    assert m.extra["source"]["skipped_files"] == [
        {"path": str(mixed_dir / "b.png"), "reason": "not valid UTF-8 at byte 0 (invalid start byte)"},
        {"path": str(mixed_dir / "c.txt"), "reason": "not valid UTF-8 at byte 11 (unexpected end of data)"},
    ]


def test_train_tokenizer_skips_undecodable_files_too(mixed_dir, tmp_path, capsys):
    from data_prep.train_tokenizer import main as train_main

    with pytest.raises(SystemExit, match=r"b.png: not valid UTF-8 at byte 0"):
        train_main(["--source", str(mixed_dir), "--out", str(tmp_path / "t.model")])
    train_main(
        [
            "--source",
            str(mixed_dir),
            "--out",
            str(tmp_path / "t.model"),
            "--on-decode-error",
            "skip",
            "--vocab-size",
            "300",
            "--cache-dir",
            str(tmp_path / "c"),
        ]
    )
    assert "skipped 2 files" in capsys.readouterr().out
    card = json.loads((tmp_path / "t.card.json").read_text())
    skipped = [f["path"] for f in card["sources"][0]["skipped_files"]]
    assert skipped == [str(mixed_dir / "b.png"), str(mixed_dir / "c.txt")]


def test_all_files_undecodable(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\xff\xfe")
    with pytest.raises(SourceError, match=r"no readable files \(all 1 were skipped: not valid UTF-8 text\)"):
        parse_source(str(tmp_path / "x.bin"), on_decode_error="skip")
    with pytest.raises(SourceError, match=r"on_decode_error 'ignore' is not one of \('error', 'skip'\)"):
        parse_source(str(tmp_path / "x.bin"), on_decode_error="ignore")


def test_one_rule_for_rows_without_text(tmp_path):
    """train_tokenizer used to skip the null rows that tokenize refused."""
    from data_prep.train_tokenizer import train_tokenizer

    def train_on(name):
        return train_tokenizer(
            [parse_source(str(tmp_path / name))], tmp_path / "t.model", vocab_size=270, cache_dir=str(tmp_path / "c")
        )

    (tmp_path / "null.jsonl").write_text('{"text": "some text"}\n' * 20 + '{"text": null}\n')
    with pytest.raises(SourceError, match=r"null.jsonl:21: field 'text' is null, expected a string"):
        train_on("null.jsonl")
    write_jsonl(tmp_path / "blank.jsonl", ["", ""])
    with pytest.raises(SourceError, match=r"'blank'.*: empty corpus \(no text in any document\)"):
        train_on("blank.jsonl")
    assert not (tmp_path / "t.model").exists()
