"""build_loaders: the trainer's training and validation loaders from data.* and train.*."""

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from shard_fixtures import EOS, VOCAB, position_tokens, write_shard_dir  # noqa: E402

from retnet_train.components.config import TrainConfig  # noqa: E402
from retnet_train.components.loaders import build_loaders, check_data  # noqa: E402
from retnet_train.data import ManifestError  # noqa: E402


def config(*paths: Path, **data) -> TrainConfig:
    cfg = TrainConfig()
    cfg.data.paths, cfg.data.seq_len, cfg.data.tokenizer = [str(p) for p in paths], 8, None
    cfg.train.micro_batch_size, cfg.train.eval_batches = 2, 2
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[5] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verify_checksums_covers_the_validation_shards(tmp_path):
    """A validation shard changed after its manifest was written (same size: only its sha256 tells)."""
    write_shard_dir(tmp_path / "web", position_tokens(1000), position_tokens(200), shard_tokens=300)
    flip_a_byte(tmp_path / "web" / "validation_00000.bin")
    build_loaders(config(tmp_path / "web"), VOCAB, 0, 1)  # sizes only: the change goes unseen
    with pytest.raises(ManifestError, match=r"validation_00000.bin: sha256 .* does not match"):
        build_loaders(config(tmp_path / "web", verify_checksums=True), VOCAB, 0, 1)


def test_megatron_prefixes_alone_are_refused_naming_data_paths(tmp_path):
    """A Megatron index records no EOS id and has no validation split: a shard directory supplies both."""
    from test_megatron_source import write_mmidx

    documents = [np.append(np.arange(10, 10 + n), EOS) for n in (20, 30, 40)]
    write_mmidx(tmp_path / "pile_text_document", documents)
    with pytest.raises(ValueError) as exc:
        build_loaders(config(tmp_path / "pile_text_document"), VOCAB, 0, 1)
    assert str(exc.value) == (
        f"data.paths: {tmp_path / 'pile_text_document'} is a Megatron dataset, which records neither the EOS id "
        "nor a validation split: list a shard directory of the same tokenizer (python -m data_prep.tokenize) "
        "in data.paths too"
    )
    write_shard_dir(tmp_path / "web", position_tokens(1000), position_tokens(200), shard_tokens=300)
    loader, val_loader = build_loaders(config(tmp_path / "pile_text_document", tmp_path / "web"), VOCAB, 0, 1)
    assert set(loader.streams) == {"pile_text_document", "web"} and loader.eos_id == EOS
    assert list(val_loader.streams) == ["web"]


def test_resume_with_same_basename_paths_swapped_is_refused(tmp_path):
    """Two sources named after the same basename (web, web_) trade places: same names, same sizes, other data."""
    for corpus, offset in (("en", 0), ("de", 50_000)):
        write_shard_dir(tmp_path / corpus / "web", position_tokens(1000, offset), position_tokens(200), 300)
    paths = [tmp_path / "en" / "web", tmp_path / "de" / "web"]
    loader, _ = build_loaders(config(*paths), VOCAB, 0, 1)
    next(loader)
    swapped = config(*reversed(paths))
    resumed, _ = build_loaders(swapped, VOCAB, 0, 1)
    assert resumed.windows == loader.windows
    with pytest.raises(ValueError) as exc:
        resumed.load_state_dict(loader.state_dict())
    assert str(exc.value).startswith(
        f"the data stream is not the checkpoint's: data source 'web' at {paths[1]} holds other data than the "
    )
    assert str(exc.value).endswith(
        f"; data.paths={swapped.data.paths} (with data.weights, data.seed, data.seq_len) must give the checkpoint's "
        "data stream. To go on with this data from the checkpoint (weights, optimizer, schedule and step kept; each "
        "unchanged source continues where it stopped): data.on_change=switch; to start afresh from its weights: a "
        "new run.dir with train.init_weights=<this checkpoint>"
    )
    swapped.data.on_change = "switch"
    switched, _ = build_loaders(swapped, VOCAB, 0, 1)
    switched.load_state_dict(loader.state_dict())
    assert switched.consumed == 0 and switched.offsets == {"web": 0, "web_": 0}  # both hold other data now
    again, _ = build_loaders(config(*paths), VOCAB, 0, 1)
    again.load_state_dict(loader.state_dict())
    assert again.consumed == 2


def test_shards_of_another_tokenizer_name_data_tokenizer_and_what_to_do(tmp_path):
    """The trainer's loaders and the preflight's check_data: the manifest, data.tokenizer and both remedies."""
    (tmp_path / "tok.model").write_bytes(b"the shards' tokenizer")
    (tmp_path / "other.model").write_bytes(b"another tokenizer")
    made, other = (hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("tok.model", "other.model"))
    write_shard_dir(tmp_path / "web", position_tokens(1000), position_tokens(200), 300, VOCAB, made)
    cfg = config(tmp_path / "web", tokenizer=str(tmp_path / "other.model"))
    expected = (
        f"{tmp_path / 'web' / 'manifest.json'}: shards were tokenized with tokenizer sha256 {made[:12]}..., but "
        f"data.tokenizer={tmp_path / 'other.model'} has sha256 {other[:12]}...: pass the tokenizer the shards "
        "were made with as data.tokenizer, or data.tokenizer=null to skip the check"
    )
    for check in (lambda: build_loaders(cfg, VOCAB, 0, 1), lambda: check_data(cfg, VOCAB, 1)):
        with pytest.raises(ManifestError) as exc:
            check()
        assert str(exc.value) == expected
    cfg.data.tokenizer = str(tmp_path / "tok.model")
    build_loaders(cfg, VOCAB, 0, 1)
    check_data(cfg, VOCAB, 1)


def test_a_missing_data_path_names_its_data_paths_entry(tmp_path):
    """As the preflight names it (the same function); a Megatron prefix exists through its .bin."""
    write_shard_dir(tmp_path / "web", position_tokens(1000), position_tokens(200), shard_tokens=300)
    cfg = config(tmp_path / "web", tmp_path / "nope")
    expected = f"data.paths[1]={tmp_path / 'nope'}: no such file or directory (from {os.getcwd()})"
    for check in (lambda: build_loaders(cfg, VOCAB, 0, 1), lambda: check_data(cfg, VOCAB, 1)):
        with pytest.raises(ValueError) as exc:
            check()
        assert str(exc.value) == expected


def test_no_validation_split_is_refused_unless_eval_interval_is_zero(tmp_path):
    """Shards without a validation split: the loaders and the preflight refuse them while the run
    evaluates; under train.eval_interval=0 there is no validation loader to build."""
    write_shard_dir(tmp_path / "web", position_tokens(1000), None, shard_tokens=300)
    cfg = config(tmp_path / "web")
    for check in (lambda: build_loaders(cfg, VOCAB, 0, 1), lambda: check_data(cfg, VOCAB, 1)):
        with pytest.raises(ManifestError, match="validation"):
            check()
    cfg.train.eval_interval = 0
    check_data(cfg, VOCAB, 1)
    loader, val_loader = build_loaders(cfg, VOCAB, 0, 1)
    assert val_loader is None and next(iter(loader))["input_ids"].shape == (2, 8)


def test_every_rank_evaluates_eval_batches_full_batches(tmp_path):
    """train.eval_batches counts each rank's batches: W data-parallel ranks together evaluate W times the
    sequences one rank does, each rank a full share."""
    write_shard_dir(tmp_path / "web", position_tokens(1000), position_tokens(400), shard_tokens=300)
    cfg = config(tmp_path / "web")  # eval_batches 2, micro_batch_size 2, seq_len 8
    for world in (1, 2):
        for rank in range(world):
            _, val_loader = build_loaders(cfg, VOCAB, rank, world)
            shapes = [tuple(batch["input_ids"].shape) for batch in val_loader]
            assert shapes == [(2, 8)] * cfg.train.eval_batches, (world, rank)


def test_a_megatron_prefix_missing_its_bin_names_the_missing_file(tmp_path):
    """data.paths naming a Megatron prefix whose .bin is gone: the error says which half is missing, not
    that the path does not exist (it is the prefix of the .idx that is there)."""
    from test_megatron_source import write_mmidx

    write_shard_dir(tmp_path / "web", position_tokens(1000), position_tokens(200), shard_tokens=300)
    write_mmidx(tmp_path / "pile_text_document", [np.append(np.arange(10, 30), EOS)])
    (tmp_path / "pile_text_document.bin").unlink()
    cfg = config(tmp_path / "web", tmp_path / "pile_text_document")
    prefix = tmp_path / "pile_text_document"
    expected = f"{prefix}.bin is missing ({prefix}.idx exists; a Megatron dataset needs both)"
    for check in (lambda: build_loaders(cfg, VOCAB, 0, 1), lambda: check_data(cfg, VOCAB, 1)):
        with pytest.raises(ManifestError) as exc:
            check()
        assert str(exc.value).endswith(expected)


def test_a_source_left_out_of_validation_is_one_warning_line_from_rank_0(tmp_path, capsys, monkeypatch):
    """The trainer's warning that a source is left out of validation is one 'warning: ...' line on stderr, as
    its other warnings are, printed by rank 0 alone (it follows from the manifests and the world size). Every
    rank printed Python's two-line form, '.../components/loaders.py:37: UserWarning: ...' and the source line."""
    import warnings

    import torch.distributed as dist

    write_shard_dir(tmp_path / "web", position_tokens(1000), position_tokens(200), shard_tokens=300)
    write_shard_dir(tmp_path / "code", position_tokens(1000), shard_tokens=300)  # no validation split
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none is left to Python's warnings
        _, val_loader = build_loaders(config(tmp_path / "web", tmp_path / "code"), VOCAB, 0, 1)
    assert list(val_loader.streams) == ["web"]
    assert capsys.readouterr().err == (
        f"warning: data source 'code' ({tmp_path / 'code'}) has no validation split with more than 8 tokens; "
        "it is left out of validation\n"
    )
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    build_loaders(config(tmp_path / "web", tmp_path / "code"), VOCAB, 0, 1)
    assert capsys.readouterr().err == ""
