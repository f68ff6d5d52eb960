"""The trainer's inputs as a user gets them wrong: each mistake is one error naming the key, file or
checkpoint, at start, instead of a traceback or a silent default."""

import pytest
from trainer_helpers import overrides, shards, typed  # noqa: F401 (shards: a fixture)

from retnet_train.components.config import TrainConfig, check_values
from retnet_train.components.typed_config import typed_config
from retnet_train.preflight import compose_trainer_config
from retnet_train.trainer import Trainer


@pytest.mark.parametrize(
    "section,key,value",
    [
        ("train", "eval_batches", 0),
        ("optim", "eps", 0.0),
        ("optim", "weight_decay", -0.1),
        ("optim", "grad_clip", -1.0),
        ("train", "peak_flops", 0.0),
    ],
)
def test_values_no_run_could_use_name_the_key(section, key, value):
    cfg = TrainConfig()
    cfg.data.paths = ["/d/web"]
    check_values(cfg)
    setattr(getattr(cfg, section), key, value)
    with pytest.raises(ValueError, match=f"^{section}.{key}: must be"):
        check_values(cfg)


def test_home_in_paths_is_expanded(tmp_path, monkeypatch):
    """The shell leaves `key=~/x` alone (and Hydra needs it quoted): without expansion the run would
    make a directory named `~` in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = typed_config(
        compose_trainer_config(
            [
                'run.dir="~/runs/a"',
                'checkpoint.dir="~/ck"',
                'data.paths=["~/d"]',
                'data.tokenizer="~/t.model"',
                'train.resume="~/runs/b"',
            ]
        )
    )
    assert (cfg.run.dir, cfg.checkpoint.dir, cfg.data.paths, cfg.data.tokenizer, cfg.train.resume) == (
        f"{tmp_path}/runs/a",
        f"{tmp_path}/ck",
        [f"{tmp_path}/d"],
        f"{tmp_path}/t.model",
        f"{tmp_path}/runs/b",
    )


def test_missing_tokenizer_names_the_key(shards, tmp_path, process_group):
    with pytest.raises(ValueError, match=f"^data.tokenizer={tmp_path / 'nope.model'}: no such file"):
        Trainer(typed(shards, tmp_path / "run", **{"data.tokenizer": str(tmp_path / "nope.model")})).train()


def test_wandb_that_cannot_start_names_the_key_when_required(shards, tmp_path, process_group, monkeypatch):
    import wandb

    def no_key(**kwargs):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", no_key)
    extra = {"wandb.mode": "online", "wandb.required": True, "train.max_steps": 1}
    with pytest.raises(ValueError, match="^wandb.mode=online: No API key configured.*wandb.mode=offline"):
        Trainer(typed(shards, tmp_path / "run", **extra)).train()


def test_wandb_that_cannot_start_leaves_the_run_training(shards, tmp_path, process_group, monkeypatch, capsys):
    """Unreachable at start, W&B is a warning (as mid-run): the run trains and saves, and a resumed run
    (a requeued job) keeps the W&B run id for a later start that reaches W&B."""
    import wandb

    def unreachable(**kwargs):
        raise wandb.errors.CommError("Network error (ConnectError), entering retry loop.")

    monkeypatch.setattr(wandb, "init", unreachable)
    summary = Trainer(typed(shards, tmp_path / "run", **{"wandb.mode": "online", "train.max_steps": 2})).train()
    assert summary["step"] == 2
    assert "warning: W&B could not start (wandb.mode=online: CommError: Network error" in capsys.readouterr().err
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) >= 1


def test_resume_into_another_model_or_data_stream_names_the_checkpoint(shards, tmp_path, process_group):
    source = tmp_path / "source"
    Trainer(typed(shards, source, **{"train.max_steps": 1})).train()
    ckpt = source / "checkpoints" / "step_00000001"
    with pytest.raises(  # refused before the engine is built, for other shapes as for the same
        ValueError, match=f"^train.resume: {ckpt} was trained with other model settings \\(model.d_model: 64 -> 96\\)"
    ):
        Trainer(typed(shards, tmp_path / "a", **{"train.resume": str(source), "model.d_model": 96})).train()
    with pytest.raises(
        ValueError,
        match=f"^train.resume: {ckpt}: data_loader: the data stream is not the checkpoint's: data.seq_len: 64 -> 32;",
    ):
        Trainer(typed(shards, tmp_path / "b", **{"train.resume": str(source), "data.seq_len": 32})).train()


def test_a_failing_write_during_training_is_one_error_naming_the_file(shards, tmp_path, process_group, monkeypatch):
    import errno

    from retnet_train.components import checkpoint
    from retnet_train.components.faults import TrainingError

    def disk_full(obj, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)  # torch.save: DeepSpeed's files and the RNG's
    with pytest.raises(
        TrainingError,
        match=f"^{tmp_path}/run/checkpoints/step_00000001/mp_rank_00_model_states.pt: "
        "No space left on device at step 1; the last checkpoint is none$",
    ):
        Trainer(typed(shards, tmp_path / "run", **{"train.max_steps": 1})).train()


def test_a_failing_read_while_resuming_names_the_checkpoint_being_loaded(shards, tmp_path, process_group, monkeypatch):
    """A file of the checkpoint that cannot be read while it loads: the error says it happened at start
    and names that checkpoint, not "at step 0" with no checkpoint."""
    from retnet_train.components import checkpoint
    from retnet_train.components.faults import TrainingError

    Trainer(typed(shards, tmp_path / "run", **{"train.max_steps": 1})).train()
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"

    load = checkpoint.torch.load
    for unreadable in ("model_states", "rng_rank0"):  # read while planning the resume; while loading it

        def refuse(path, *args, _name=unreadable, **kwargs):
            if _name in str(path):
                raise PermissionError(13, "Permission denied", str(path))
            return load(path, *args, **kwargs)

        monkeypatch.setattr(checkpoint.torch, "load", refuse)
        with pytest.raises(
            TrainingError, match=f"{unreadable}.pt: Permission denied at start; the last checkpoint is {ckpt}$"
        ):
            Trainer(typed(shards, tmp_path / "run", **{"train.max_steps": 2})).train()


def test_the_loaders_check_token_ids_so_the_model_does_not(shards, tmp_path, process_group):
    """Every id the loaders hand out is checked against the vocabulary on the host (data/token_stream.py),
    so the trainer's model skips its own check, a device-to-host sync per micro-batch on a GPU."""
    trainer = Trainer(typed(shards, tmp_path / "run"))
    try:
        trainer.build()
        vocab = trainer.model_cfg.vocab_size
        assert trainer.model.check_inputs is False
        streams = [*trainer.loader.streams.values(), *trainer.val_loader.streams.values()]
        assert streams and all(s.vocab_size == vocab for s in streams)
    finally:
        trainer.close()


def test_the_tokenizer_is_hashed_once_for_the_record_and_the_shard_check(shards, tmp_path, process_group, monkeypatch):
    import retnet_train.components.loaders as loaders

    tokenizer = tmp_path / "tok.model"
    tokenizer.write_bytes(b"a tokenizer")
    hashed = []

    def sha256_file(path):  # the digest the fixture's shards were made with (shard_fixtures.TOKENIZER_SHA)
        hashed.append(str(path))
        return "ab" * 32

    monkeypatch.setattr(loaders, "sha256_file", sha256_file)
    trainer = Trainer(typed(shards, tmp_path / "run", **{"data.tokenizer": str(tokenizer)}))
    try:
        trainer.build()
        assert trainer.tokenizer == {"sha256": "ab" * 32, "path": str(tokenizer.resolve())}
        assert hashed == [str(tokenizer)]
    finally:
        trainer.close()
