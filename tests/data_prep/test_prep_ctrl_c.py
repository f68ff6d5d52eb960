"""Ctrl-C in any data_prep command is one line on stderr and status 130, not a traceback."""

import pytest

import data_prep.debian_corpus as debian_corpus
import data_prep.sample_corpus as sample_corpus
import data_prep.train_tokenizer as train_tokenizer


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    "module, target, argv, message",
    [
        (
            train_tokenizer,
            "train_tokenizer",
            ["--source", "{corpus}", "--out", "{tmp}/tok/t.model"],
            "interrupted: run the same command again",
        ),
        (
            sample_corpus,
            "build_sample",
            ["--out", "{tmp}/sample"],
            "interrupted: run the same command again to resume",
        ),
        (
            debian_corpus,
            "build_corpus",
            ["--debs", "{tmp}", "--out", "{tmp}/deb"],
            "interrupted: {tmp}/deb is unchanged; run the same command again",
        ),
    ],
)
def test_ctrl_c_is_one_line_and_status_130(tmp_path, monkeypatch, capsys, module, target, argv, message):
    corpus = tmp_path / "c.txt"
    corpus.write_text("some text\n")
    monkeypatch.setattr(module, target, _interrupt)
    raised = None
    try:
        module.main([a.format(corpus=corpus, tmp=tmp_path) for a in argv])
    except BaseException as e:  # a KeyboardInterrupt that got through must fail this test, not stop pytest
        raised = e
    assert isinstance(raised, SystemExit) and raised.code == 130, repr(raised)
    assert capsys.readouterr().err.strip().splitlines()[-1] == message.format(tmp=tmp_path)
