"""Input sources (files, globs, directories, datasets) and the bad-input errors."""
import gzip
import json

import datasets
import pytest

from data_prep.sources import SourceError, load_source, parse_source
from data_prep.tokenize import main as tokenize_main
from data_prep.tokenize import tokenize_source
from prep_helpers import make_tokenizer, write_jsonl
from retnet_train.data import read_manifest


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


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


def test_jsonl_gz_parquet_and_field_name(tmp_path):
    rows = [{"body": "alpha"}, {"body": "beta"}]
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    assert texts_of(parse_source(str(tmp_path / "c.jsonl.gz"), text_field="body"), tmp_path) == ["alpha", "beta"]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p" / "c.parquet"))
    assert texts_of(parse_source(str(tmp_path / "p" / "c.parquet"), text_field="body"), tmp_path) == ["alpha", "beta"]
    with pytest.raises(SourceError, match=r"no text field 'text'; columns are \['body'\]"):
        texts_of(parse_source(str(tmp_path / "c.jsonl.gz")), tmp_path)


def test_datasets_sources(tmp_path):
    ds = datasets.Dataset.from_dict({"content": ["one", "two", "three"], "n": [1, 2, 3]})
    ds.save_to_disk(str(tmp_path / "saved"))
    assert texts_of(parse_source(f"s=disk:{tmp_path / 'saved'}", text_field="content"), tmp_path) == ["one", "two", "three"]
    # any datasets.load_dataset spec; here a local parquet directory (no network in tests)
    (tmp_path / "hub").mkdir()
    ds.to_parquet(str(tmp_path / "hub" / "train.parquet"))
    src = parse_source(f"h=hf:{tmp_path / 'hub'}@train", text_field="content")
    assert src.name == "h"
    assert texts_of(src, tmp_path) == ["one", "two", "three"]


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
        tokenize_source(parse_source(str(tmp_path / "zero.jsonl")), tok, tmp_path / "o1", progress=False,
                        cache_dir=str(tmp_path / "c"))
    write_jsonl(tmp_path / "blank.jsonl", ["", "", ""])
    with pytest.raises(SourceError, match=r"'blank'.*empty corpus \(no text in any document\)"):
        tokenize_source(parse_source(str(tmp_path / "blank.jsonl")), tok, tmp_path / "o2", progress=False,
                        cache_dir=str(tmp_path / "c"))
    assert not (tmp_path / "o2" / "manifest.json").exists()
    (tmp_path / "null.jsonl").write_text('{"text": "a"}\n{"text": null}\n')
    with pytest.raises(SourceError, match=r"null.jsonl:2: field 'text' is null, expected a string"):
        tokenize_source(parse_source(str(tmp_path / "null.jsonl")), tok, tmp_path / "o3", progress=False,
                        cache_dir=str(tmp_path / "c"))


def test_cli_several_named_sources(tok, tmp_path, capsys):
    write_jsonl(tmp_path / "web.jsonl", [f"web page {i} " * 20 for i in range(40)])
    (tmp_path / "code").mkdir()
    for i in range(5):
        (tmp_path / "code" / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n")
    tokenize_main(["--tokenizer", str(tok.path), "--out", str(tmp_path / "out"), "--source", f"web={tmp_path}/web.jsonl",
                   "--source", f"code={tmp_path}/code", "--validation-fraction", "0.1", "--num-proc", "2",
                   "--cache-dir", str(tmp_path / "c")])
    web, code = read_manifest(tmp_path / "out" / "web"), read_manifest(tmp_path / "out" / "code")
    assert web.split("train").documents + web.split("validation").documents == 40
    assert code.split("train").documents + code.split("validation").documents == 5
    assert web.tokenizer_sha256 == code.tokenizer_sha256 == tok.sha256
    assert "web/manifest.json: train" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="output already exists"):  # a second run refuses, one line
        tokenize_main(["--tokenizer", str(tok.path), "--out", str(tmp_path / "out"), "--source", f"web={tmp_path}/web.jsonl",
                       "--cache-dir", str(tmp_path / "c")])
    with pytest.raises(SystemExit, match="source names must be unique"):
        tokenize_main(["--tokenizer", str(tok.path), "--out", str(tmp_path / "o"), "--source", f"a={tmp_path}/web.jsonl",
                       "--source", f"a={tmp_path}/code"])
