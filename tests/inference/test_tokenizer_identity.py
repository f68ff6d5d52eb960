"""A checkpoint records its tokenizer's sha256 and absolute path at launch (client_state["tokenizer"]):
inference finds the tokenizer from any directory and refuses one of the same size with other pieces,
which would give other text and perplexities without a word. Checkpoints without the record load as
they always did."""

import hashlib
import os
import shutil

import pytest
import torch
from gen_fixtures import (
    TEXTS,
    TINY_TRAINER_MODEL,
    init_dist,
    tiny_config,
    train_tokenizer,
    write_deepspeed_checkpoint,
    write_shards,
)

from retnet_train.inference.deepspeed_checkpoint import read_model_states
from retnet_train.inference.errors import CheckpointError
from retnet_train.inference.generate import main as generate_main
from retnet_train.inference.load import load_model

pytest.importorskip("deepspeed")


def train_tiny_run(launch, run_dir, shards) -> None:
    """Two steps of the real trainer in this process (one rank, CPU), launched from `launch` with the
    relative data.tokenizer=data/tok.model and an absolute run.dir: a checkpoint at step 2."""
    from retnet_train.components.typed_config import typed_config
    from retnet_train.preflight import compose_trainer_config
    from retnet_train.trainer import Trainer

    settings = {
        **TINY_TRAINER_MODEL,
        "data.paths": f"[{shards}]",
        "data.tokenizer": "data/tok.model",
        "data.seq_len": 16,
        "train.micro_batch_size": 2,
        "train.global_batch_tokens": 32,
        "train.max_steps": 2,
        "train.device": "cpu",
        "train.eval_interval": 0,
        "deepspeed.precision": "fp32",
        "deepspeed.zero_stage": 0,
        "checkpoint.interval": 2,
        "run.dir": str(run_dir),
    }
    init_dist()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(launch)
        cfg = typed_config(compose_trainer_config([f"{k}={v}" for k, v in settings.items()]))
        Trainer(cfg).train()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run dir, the tokenizer trained with as copied into the launch dir, a tokenizer of the same size
    with other pieces)."""
    root = tmp_path_factory.mktemp("tokid").resolve()  # the recorded path is the resolved one
    tok = train_tokenizer(root)
    (root / "bpe").mkdir()
    other = train_tokenizer(root / "bpe", model_type="bpe")  # same size, other pieces
    launch = root / "launch"
    (launch / "data").mkdir(parents=True)
    shutil.copy(tok, launch / "data" / "tok.model")
    write_shards(root / "shards", tok, TEXTS * 40)
    train_tiny_run(launch, root / "run", root / "shards")
    return root / "run", launch / "data" / "tok.model", other


def test_a_trained_checkpoint_records_the_tokenizer_sha256_and_absolute_path(run):
    run_dir, tok, _ = run
    state = read_model_states(str(run_dir / "checkpoints" / "step_00000002"))
    assert state["config"]["data"]["tokenizer"] == "data/tok.model"  # as given, relative to the launch dir
    assert state["tokenizer"] == {"sha256": hashlib.sha256(tok.read_bytes()).hexdigest(), "path": str(tok)}


def test_the_recorded_path_is_used_where_the_relative_one_is_not_found(run, tmp_path, monkeypatch):
    """run.dir absolute: the launch dir cannot be recovered from the checkpoint's location."""
    run_dir, tok, _ = run
    monkeypatch.chdir(tmp_path)
    assert load_model(str(run_dir)).tokenizer_path == str(tok)


def test_a_tokenizer_of_the_same_size_with_other_pieces_is_refused_naming_both(run, capsys):
    run_dir, tok, other = run
    sha = hashlib.sha256(tok.read_bytes()).hexdigest()
    with pytest.raises(CheckpointError) as e:
        load_model(str(run_dir), tokenizer=str(other))
    assert str(e.value) == (
        f"--tokenizer: {other} (sha256 {hashlib.sha256(other.read_bytes()).hexdigest()[:12]}...) differs from "
        f"the tokenizer the model was trained with ({tok}, sha256 {sha[:12]}..., as {run_dir} records); token "
        "ids would not mean the same pieces"
    )
    # also when the file trained with is gone, where no path could be compared; the command says so too
    hidden = tok.with_suffix(".hidden")
    os.rename(tok, hidden)
    try:
        with pytest.raises(SystemExit, match=f"error: --tokenizer: {other} .* differs from .*{tok}"):
            generate_main(["--checkpoint", str(run_dir), "--tokenizer", str(other), "--prompt", "one"])
    finally:
        os.rename(hidden, tok)


def test_the_same_tokenizer_copied_elsewhere_is_accepted(run, tmp_path, capsys):
    run_dir, tok, _ = run
    copy = tmp_path / "elsewhere.model"
    shutil.copy(tok, copy)
    assert load_model(str(run_dir), tokenizer=str(copy)).tokenizer_path == str(copy)
    hidden = tok.with_suffix(".hidden")
    os.rename(tok, hidden)  # the file trained with is gone: the copy's sha256 still proves it
    try:
        capsys.readouterr()
        args = ["--checkpoint", str(run_dir), "--tokenizer", str(copy), "--prompt", "one", "--max-new-tokens", "2"]
        assert generate_main([*args, "--greedy"]) == 0
        assert capsys.readouterr().out.strip()
    finally:
        os.rename(hidden, tok)


def test_a_stored_tokenizer_changed_since_training_is_refused(run, tmp_path, monkeypatch):
    """The relative path found from the current directory holds another tokenizer of the same size:
    refused, naming the file trained with."""
    run_dir, tok, other = run
    (tmp_path / "data").mkdir()
    shutil.copy(other, tmp_path / "data" / "tok.model")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as e:
        load_model(str(run_dir))
    assert str(e.value).startswith(f"the tokenizer named by {run_dir}: data/tok.model (sha256 ")
    assert f"differs from the tokenizer the model was trained with ({tok}, sha256 " in str(e.value)
    assert str(e.value).endswith("; pass the tokenizer it was trained with as --tokenizer")


def test_neither_the_relative_nor_the_recorded_path_found_names_both(run, tmp_path, monkeypatch):
    run_dir, tok, _ = run
    hidden = tok.with_suffix(".hidden")
    os.rename(tok, hidden)
    monkeypatch.chdir(tmp_path)
    try:
        with pytest.raises(CheckpointError) as e:
            load_model(str(run_dir))
    finally:
        os.rename(hidden, tok)
    assert str(e.value) == (
        f"the tokenizer named by {run_dir}: data/tok.model does not exist (relative to the directory training "
        f"was launched from, nor at {tok}, its path at launch: run from there or pass --tokenizer)"
    )


def test_a_checkpoint_without_the_record_loads_as_before(tmp_path):
    """Written before checkpoints recorded the sha256: the named tokenizer is used, and a given one is
    compared with it where it is found."""
    tok = train_tokenizer(tmp_path)
    (tmp_path / "bpe").mkdir()
    other = train_tokenizer(tmp_path / "bpe", model_type="bpe")
    cfg = tiny_config()
    save = tmp_path / "old" / "checkpoints"
    trained = write_deepspeed_checkpoint(save, cfg, 1, {"config": {"model": cfg, "data": {"tokenizer": str(tok)}}})
    loaded = load_model(str(tmp_path / "old"))
    assert loaded.tokenizer_path == str(tok)
    for k, v in trained.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[k], v, rtol=0, atol=0)
    copy = tmp_path / "copy.model"
    shutil.copy(tok, copy)
    assert load_model(str(tmp_path / "old"), tokenizer=str(copy)).tokenizer_path == str(copy)
    with pytest.raises(CheckpointError, match="differs from the tokenizer the model was trained with"):
        load_model(str(tmp_path / "old"), tokenizer=str(other))


def test_a_malformed_record_is_an_error_naming_the_file(tmp_path):
    tok = train_tokenizer(tmp_path)
    cfg = tiny_config()
    client = {"config": {"model": cfg, "data": {"tokenizer": str(tok)}}, "tokenizer": {"sha256": "abc"}}
    write_deepspeed_checkpoint(tmp_path / "bad", cfg, 0, client, tag="t")
    with pytest.raises(CheckpointError, match=r"t/mp_rank_00_model_states.pt: client state 'tokenizer' is "):
        load_model(str(tmp_path / "bad"))
