"""`--help` of the data_prep commands shows their usage examples as written: a pasted example keeps its
line continuation, and the text names the newline piece as "\\n"."""

import pytest

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
