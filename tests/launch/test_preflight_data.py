"""The preflight reads the shard manifests as the trainer's loaders do and fails, with the trainer's own
message, on what the trainer would only refuse after the queue wait."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from shard_fixtures import position_tokens, write_shard_dir  # noqa: E402

from retnet_train import preflight as pf  # noqa: E402
from retnet_train.components.loaders import build_loaders  # noqa: E402
from retnet_train.components.typed_config import typed_config  # noqa: E402

VOCAB = 8192  # configs/model/tiny.yaml


@pytest.fixture
def corpus(tmp_path):
    """A tokenizer file and a shard directory of 3000 training and 1100 validation tokens made with it."""
    (tmp_path / "tok.model").write_bytes(b"sentencepiece stand-in")
    write_shards(tmp_path, "web", 3000, 1100)
    return tmp_path


def write_shards(root: Path, name: str, train: int, validation: int | None) -> None:
    """A shard directory root/name tokenized with root/tok.model."""
    sha = hashlib.sha256((root / "tok.model").read_bytes()).hexdigest()
    held_out = None if validation is None else position_tokens(validation)
    write_shard_dir(root / name, position_tokens(train), held_out, 1000, VOCAB, sha)


def overrides(root: Path, *more: str) -> list[str]:
    return [
        "experiment=tiny_cpu",  # seq_len 256, micro_batch_size 8, eval_batches 8
        f"run.dir={root / 'run'}",
        f"data.paths=[{root / 'web'}]",
        f"data.tokenizer={root / 'tok.model'}",
        *more,
    ]


def trainer_error(args: list[str], dp_world: int) -> str:
    """What the trainer's build_loaders raises for these overrides on `dp_world` data-parallel ranks."""
    cfg = typed_config(pf.compose_trainer_config(args))
    with pytest.raises(ValueError) as exc:
        build_loaders(cfg, cfg.model["vocab_size"], 0, dp_world)
    return str(exc.value)


def preflight_fails_as_the_trainer(capsys, args: list[str], *options: str, dp_world: int = 1) -> str:
    assert pf.main([*options, "--", *args]) == 1
    err = capsys.readouterr().err
    expected = trainer_error(args, dp_world)
    assert f"  - trainer config: {expected}\n" in err, err
    return expected


def test_good_data_passes(corpus, capsys):
    assert pf.main(["--nproc-per-node", "2", "--", *overrides(corpus, "train.micro_batch_size=4")]) == 0, (
        capsys.readouterr()
    )


def test_another_tokenizer_fails(corpus, capsys):
    (corpus / "other.model").write_bytes(b"another tokenizer")
    message = preflight_fails_as_the_trainer(capsys, overrides(corpus, f"data.tokenizer={corpus / 'other.model'}"))
    assert message.startswith(f"{corpus / 'web' / 'manifest.json'}: shards were tokenized with tokenizer sha256 ")
    assert f"but data.tokenizer={corpus / 'other.model'} has sha256 " in message
    assert message.endswith("or data.tokenizer=null to skip the check")


def test_a_missing_data_path_fails_naming_its_entry(corpus, capsys):
    args = overrides(corpus, f"data.paths=[{corpus / 'web'},{corpus / 'nope'}]")
    message = preflight_fails_as_the_trainer(capsys, args)
    assert message.startswith(f"data.paths[1]={corpus / 'nope'}: no such file or directory (from ")


def test_another_vocab_size_fails(corpus, capsys):
    message = preflight_fails_as_the_trainer(capsys, overrides(corpus, "model.vocab_size=4096"))
    assert message == (
        f"{corpus / 'web' / 'manifest.json'}: shards have vocab_size 8192, but the model expects 4096 "
        "(model.vocab_size: set it to 8192, or point data.paths at shards of its tokenizer)"
    )


def test_seq_len_longer_than_a_source_fails(corpus, capsys):
    write_shards(corpus, "small", 200, 1100)
    args = overrides(corpus, f"data.paths=[{corpus / 'web'},{corpus / 'small'}]")
    message = preflight_fails_as_the_trainer(capsys, args)
    assert message == (
        f"{corpus / 'small' / 'manifest.json'}: seq_len 256 is longer than source 'small' "
        "(200 tokens; a sequence needs seq_len + 1)"
    )


def test_validation_split_smaller_than_the_ranks_fails(corpus, capsys):
    """1100 validation tokens: 4 sequences of 256, for 8 data-parallel ranks."""
    args = overrides(corpus, "train.micro_batch_size=1")
    message = preflight_fails_as_the_trainer(capsys, args, "--nproc-per-node", "8", dp_world=8)
    assert message == (
        f"validation split has 4 sequences of 256 tokens, fewer than dp_world_size=8 "
        f"(sources: {corpus / 'web' / 'manifest.json'})"
    )
    assert pf.main(["--nproc-per-node", "4", "--", *overrides(corpus, "train.micro_batch_size=2")]) == 0


def test_missing_validation_split_fails(corpus, capsys):
    write_shards(corpus, "web", 3000, None)
    message = preflight_fails_as_the_trainer(capsys, overrides(corpus))
    assert message == (
        "no data source has a validation split of more than 256 tokens (sources: ['web']; the longest: 0); the "
        "validation loss needs one: a larger --validation-fraction (python -m data_prep.tokenize), or no "
        "validation (train.eval_interval=0; evaluate: --tasks without --data)"
    )


def test_invalid_manifest_fails(corpus, capsys):
    manifest = corpus / "web" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "dtype": "int8"}))
    message = preflight_fails_as_the_trainer(capsys, overrides(corpus))
    assert message == f"{manifest}: key 'dtype' is 'int8', expected one of ['uint16', 'uint32']"


def test_shards_are_not_read(corpus, capsys):
    """Only the manifests: a shard file the trainer would refuse (wrong size) is not opened here."""
    (corpus / "web" / "train_00000.bin").write_bytes(b"")
    assert pf.main(["--", *overrides(corpus)]) == 0, capsys.readouterr()


def test_data_checks_wait_for_the_data_values(corpus, capsys):
    """A bad data.* value is reported once, by the value checks; another key's does not hide the data's problems."""
    assert pf.main(["--", *overrides(corpus, "data.seq_len=0")]) == 1
    assert capsys.readouterr().err.count("  - trainer config: ") == 1
    assert pf.main(["--", *overrides(corpus, "optim.lr=-1", f"data.tokenizer={corpus / 'none.model'}")]) == 1
    err = capsys.readouterr().err
    assert "  - trainer config: optim.lr: " in err
    assert f"  - trainer config: data.tokenizer={corpus / 'none.model'}: no such file (from " in err
