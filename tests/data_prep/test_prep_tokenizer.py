import json

import pytest
from prep_helpers import SPECIAL_DOCS, corpus_texts, make_tokenizer, write_jsonl

from data_prep.sources import parse_source
from data_prep.tokenizer_card import TokenizerError, card_path_for, load_tokenizer
from data_prep.train_tokenizer import MAX_LINE_CHARS, train_tokenizer, training_lines
from retnet_train.data.manifest import sha256_file


def test_card_describes_the_model(tok):
    card = json.loads(card_path_for(tok.path).read_text())
    assert card["sha256"] == sha256_file(tok.path)
    assert card["vocab_size"] == tok.processor.get_piece_size() == 1000
    assert (card["unk_id"], card["bos_id"], card["eos_id"], card["pad_id"]) == (0, 1, 2, 3)
    assert card["model_type"] == "bpe" and card["byte_fallback"] is True
    assert card["num_docs"] == len(corpus_texts())


def test_lossless_round_trip(tok):
    for text in SPECIAL_DOCS + corpus_texts()[:5]:
        ids = tok.processor.encode(text)
        assert tok.eos_id not in ids and tok.bos_id not in ids
        assert tok.processor.decode(ids) == text
    assert tok.processor.encode("\n") == [tok.processor.piece_to_id("\n")]  # newline is one piece


def test_training_lines_split_long_lines_and_skip_blank_ones():
    """sentencepiece drops a sentence longer than its limit: a long line is fed as consecutive pieces of
    MAX_LINE_CHARS (all of its text, in order), blank and whitespace-only lines not at all."""
    long = "".join(chr(ord("a") + i % 26) for i in range(2 * MAX_LINE_CHARS + 100))
    lines = list(training_lines([f"first\n\n   \n{long}", "", "last line\n"]))
    assert lines == ["first", long[:MAX_LINE_CHARS], long[MAX_LINE_CHARS:-100], long[-100:], "last line"]
    assert all(len(line) <= MAX_LINE_CHARS for line in lines)


def test_training_is_deterministic(tok, tmp_path):
    again = make_tokenizer(tmp_path)
    assert again.sha256 == tok.sha256


def test_sample_of_n_documents_is_seeded(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", corpus_texts())
    kw = dict(vocab_size=600, num_docs=20, cache_dir=str(tmp_path / "cache"))
    a = train_tokenizer([parse_source(str(corpus))], tmp_path / "a.model", seed=1, **kw)
    b = train_tokenizer([parse_source(str(corpus))], tmp_path / "b.model", seed=1, **kw)
    c = train_tokenizer([parse_source(str(corpus))], tmp_path / "c.model", seed=2, **kw)
    assert a.sha256 == b.sha256 != c.sha256
    assert json.loads(card_path_for(a.path).read_text())["num_docs"] == 20


def test_never_overwrites_without_flag(tok, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", ["some text here"] * 50)
    before = tok.path.read_bytes()
    with pytest.raises(TokenizerError, match=rf"{tok.path}: already exists; pass --overwrite"):
        train_tokenizer([parse_source(str(corpus))], tok.path, vocab_size=300)
    assert tok.path.read_bytes() == before


def test_card_of_another_model_is_refused(tok, tmp_path):
    model = tmp_path / "copy.model"
    model.write_bytes(tok.path.read_bytes())
    card = json.loads(card_path_for(tok.path).read_text())
    card["sha256"] = "0" * 64
    card_path_for(model).write_text(json.dumps(card))
    with pytest.raises(TokenizerError, match=r"copy.card.json: sha256 is '0000.*copy.model has"):
        load_tokenizer(model)


def test_cli_errors_are_one_line(tmp_path, capsys):
    from data_prep.train_tokenizer import main

    with pytest.raises(SystemExit, match=rf"error: {tmp_path}/missing.jsonl: no such file or directory"):
        main(["--source", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "t.model")])
    assert not (tmp_path / "t.model").exists()


def test_unigram_via_cli(tmp_path, capsys):
    from data_prep.train_tokenizer import main

    corpus = write_jsonl(tmp_path / "c.jsonl", corpus_texts())
    main(
        [
            "--source",
            f"c={corpus}",
            "--out",
            str(tmp_path / "u.model"),
            "--model-type",
            "unigram",
            "--vocab-size",
            "700",
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    assert "wrote" in capsys.readouterr().out
    tok = load_tokenizer(tmp_path / "u.model")
    card = json.loads(card_path_for(tok.path).read_text())
    assert card["model_type"] == "unigram" and card["vocab_size"] == 700
    for text in SPECIAL_DOCS:
        assert tok.processor.decode(tok.processor.encode(text)) == text


def test_corpus_too_small_for_the_vocab(tmp_path):
    (tmp_path / "tiny.txt").write_text("a b c\n")
    with pytest.raises(TokenizerError, match=r"tiny.txt'\] failed: .*Vocabulary size too high \(8192\)"):
        train_tokenizer(
            [parse_source(str(tmp_path / "tiny.txt"))],
            tmp_path / "t.model",
            model_type="unigram",
            cache_dir=str(tmp_path / "c"),
        )
    assert not (tmp_path / "t.model").exists()


def test_unwritable_out_fails_before_training(tmp_path, monkeypatch):
    from data_prep.train_tokenizer import main

    corpus = write_jsonl(tmp_path / "c.jsonl", ["some text here"] * 50)
    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr("data_prep.train_tokenizer._train", lambda *a, **k: pytest.fail("trained anyway"))
    with pytest.raises(SystemExit, match=r"^error: .*afile/tok: cannot be created: .*afile is a file$"):
        main(["--source", str(corpus), "--out", str(tmp_path / "afile" / "tok" / "t.model")])
    (tmp_path / "dir.model").mkdir()
    with pytest.raises(SystemExit, match=r"^error: .*dir.model: is a directory; --out is the path of the .model"):
        main(["--source", str(corpus), "--out", str(tmp_path / "dir.model"), "--overwrite"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"vocab_size": 0}, r"vocab_size and num_docs must be >= 1, got 0 and 100000"),
        ({"num_docs": 0}, r"vocab_size and num_docs must be >= 1, got 8192 and 0"),
        ({"ids": (0, 1, 1, 3)}, r"bos_id and eos_id are both 1; special ids must differ \(-1 disables one\)"),
        ({"ids": (0, 1, 2, 9000)}, r"pad_id 9000 is not below vocab_size 8192"),
        ({"ids": (-1, 1, 2, 3)}, r"unk_id and eos_id must be >= 0 \(got -1 and 2\)"),
        ({"seed": -1}, r"seed must be in \[0, 2\*\*32\), got -1"),
        ({"seed": 2**32}, r"seed must be in \[0, 2\*\*32\), got 4294967296"),
    ],
)
def test_bad_settings_fail_before_the_corpus_is_read(tmp_path, monkeypatch, kwargs, message):
    monkeypatch.setattr("data_prep.train_tokenizer.load_source", lambda *a: pytest.fail("read the corpus anyway"))
    (tmp_path / "c.txt").write_text("text")
    with pytest.raises(TokenizerError, match=rf"^{message}$"):
        train_tokenizer([parse_source(str(tmp_path / "c.txt"))], tmp_path / "t.model", **kwargs)


def test_bos_option_needs_a_model_with_bos(tmp_path):
    from data_prep.tokenize import tokenize_source

    corpus = write_jsonl(tmp_path / "c.jsonl", corpus_texts())
    tok = train_tokenizer(
        [parse_source(str(corpus))],
        tmp_path / "nobos.model",
        vocab_size=1000,
        ids=(0, -1, 2, 3),
        cache_dir=str(tmp_path / "cache"),
    )
    assert tok.bos_id == -1
    with pytest.raises(TokenizerError, match=r"nobos.model: the model has no BOS id .*; --bos needs one"):
        tokenize_source(parse_source(str(corpus)), tok, tmp_path / "out", add_bos=True, progress=False)
    assert not (tmp_path / "out").exists()
