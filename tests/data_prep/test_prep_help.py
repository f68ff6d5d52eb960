"""`--help` of the data_prep commands shows their usage examples as written: a pasted example keeps its
line continuation, and the text names the newline piece as "\\n"."""

import pytest
from cli_help import assert_every_option_documented

from data_prep import tokenize, train_tokenizer


def help_text(main, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def test_train_tokenizer_help_shows_its_example_and_the_newline_piece(capsys):
    text = help_text(train_tokenizer.main, capsys)
    assert "--out tok/tokenizer.model \\\n        --vocab-size 32000 --num-docs 200000" in text
    assert '"\\n" as a piece of its own' in text


def test_tokenize_help_shows_its_example_with_the_continuation(capsys):
    text = help_text(tokenize.main, capsys)
    assert "--out data/shards \\\n        --source web=corpus/web/*.jsonl" in text


@pytest.mark.parametrize(
    "module_name,argv,named",
    [
        ("tokenize", ["--tokenizer", "t.model", "--out", "o"], "the following arguments are required: --source"),
        ("train_tokenizer", ["--vocab-size", "abc"], "--vocab-size: invalid int value: 'abc'"),
        ("verify", ["d", "--sizes-onyl"], "unrecognized arguments: --sizes-onyl"),
        ("sample_corpus", ["--max-bytes", "x"], "--max-bytes: invalid int value: 'x'"),
    ],
)
def test_a_flag_the_parser_refuses_is_one_line_naming_it(module_name, argv, named, capsys):
    """As the README's exit codes say of the data_prep and inference CLIs: status 2 and one line naming the
    flag, as the inference commands print it. argparse printed the whole usage first (11 lines for tokenize)."""
    import importlib

    module = importlib.import_module(f"data_prep.{module_name}")
    with pytest.raises(SystemExit) as stop:
        module.main(argv)
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"error: {named} (--help lists the options)\n"


@pytest.mark.parametrize("module_name", ["tokenize", "train_tokenizer", "sample_corpus", "verify", "bench"])
def test_every_option_says_what_it_does_and_its_default(module_name, monkeypatch):
    """docs/data.md sends a user to `--help` for every option: each says what it does, and one with a default
    gives it. 27 options had no help (tokenize's --validation-fraction, --seed, --shard-tokens, --num-proc,
    train_tokenizer's --vocab-size, --seed, the special ids, sample_corpus's all four, ...), and --num-docs,
    --max-sentences, --chunk-docs and --on-decode-error did not give their defaults."""
    assert_every_option_documented(f"data_prep.{module_name}", monkeypatch)
