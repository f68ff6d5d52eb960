"""Loading a model from a real DeepSpeed checkpoint (ZeRO 0/2/3, consolidated with
deepspeed.utils.zero_to_fp32) and from our export; bad paths and mismatches are clear errors."""

import json
import os

import pytest
import sentencepiece as spm
import torch
import yaml
from gen_fixtures import VOCAB, tiny_config, tiny_model, train_tokenizer, write_deepspeed_checkpoint

from retnet_train.inference.cli import read_model_config
from retnet_train.inference.errors import CheckpointError
from retnet_train.inference.generate import main as generate_main
from retnet_train.inference.load import load_model
from retnet_train.inference.native import save_native
from retnet_train.model import model_config_from_dict


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return str(train_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.mark.parametrize(
    "stage,arch,bf16",
    [
        (0, "retnet", False),
        (2, "retnet", False),
        (3, "retnet", False),
        (2, "transformer", False),
        (1, "retnet", True),
        (3, "retnet", True),
    ],
)
def test_deepspeed_checkpoint_round_trip(tmp_path, tokenizer, stage, arch, bf16):
    cfg = tiny_config(arch, tie_embeddings=(stage == 2 and arch == "retnet"))
    client = {"config": {"model": cfg, "data": {"tokenizer": tokenizer}}, "step": 2}
    ref = write_deepspeed_checkpoint(tmp_path / "ckpt", cfg, stage, client, bf16=bf16)
    loaded = load_model(str(tmp_path / "ckpt"))
    assert loaded.source == "deepspeed" and loaded.tokenizer_path == tokenizer
    assert loaded.config.to_dict() == ref.config.to_dict()
    for k, v in ref.state_dict().items():
        got = loaded.model.state_dict()[k]
        if bf16:  # the fp32 master weights, of which the bf16 module holds the rounding
            assert got.dtype == torch.float32
            got = got.bfloat16().float()
        torch.testing.assert_close(got, v, rtol=0, atol=0, msg=k)
    ids = torch.randint(0, VOCAB, (1, 7))
    if not bf16:
        torch.testing.assert_close(loaded.model(ids).logits, ref(ids).logits)
    # the weights really changed in training (so a fresh init would not pass the check above)
    fresh = tiny_model(arch)
    assert not torch.equal(
        fresh.state_dict()["layers.0.ffn.fc1.weight"], loaded.model.state_dict()["layers.0.ffn.fc1.weight"]
    )
    # the tag dir itself is accepted as well
    tag = (tmp_path / "ckpt" / "latest").read_text().strip()
    assert load_model(str(tmp_path / "ckpt" / tag)).meta["tag"] == tag


def test_checkpoint_errors(tmp_path, tokenizer):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no 'latest' file"):
        load_model(str(tmp_path / "empty"))
    cfg = tiny_config()
    write_deepspeed_checkpoint(tmp_path / "noconf", cfg, 0, {"step": 1}, steps=1)
    with pytest.raises(CheckpointError, match="no model config"):
        load_model(str(tmp_path / "noconf"))
    # an explicit preset that does not match the weights
    with pytest.raises(CheckpointError, match="shape"):
        load_model(str(tmp_path / "noconf"), model_config=tiny_config(d_model=64))
    assert load_model(str(tmp_path / "noconf"), model_config=cfg).config.d_model == 32
    with pytest.raises(CheckpointError, match=r"--tag nope: no checkpoint nope in .*noconf \(it holds global_step1\)"):
        load_model(str(tmp_path / "noconf"), tag="nope")


def test_export_round_trip_and_tokenizer_checks(tmp_path, tokenizer):
    model = tiny_model("retnet", tie_embeddings=True)
    out = save_native(model, str(tmp_path / "exp"), tokenizer)
    modes = {name: os.stat(os.path.join(out, name)).st_mode & 0o777 for name in os.listdir(out)}
    assert set(modes) == {"model.safetensors", "config.json", "tokenizer.model"}
    assert len(set(modes.values())) == 1, modes  # the weights readable by whoever can read the rest
    loaded = load_model(out)
    assert loaded.source == "export" and loaded.tokenizer_path.endswith("tokenizer.model")
    ids = torch.randint(0, VOCAB, (2, 5))
    torch.testing.assert_close(loaded.model(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert loaded.model.lm_head.weight is loaded.model.embed_tokens.weight
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(out, tokenizer=str(tmp_path / "nope.model"))
    (tmp_path / "bpe").mkdir()
    other = train_tokenizer(tmp_path / "bpe", model_type="bpe")  # same size, other pieces
    with pytest.raises(CheckpointError, match="differs from the tokenizer the model was trained with"):
        load_model(out, tokenizer=str(other))
    small = train_tokenizer(tmp_path, vocab_size=200)
    with pytest.raises(CheckpointError, match="vocabulary of 200 pieces, model has vocab_size=256"):
        load_model(out, tokenizer=str(small))
    cfg = json.loads((tmp_path / "exp" / "config.json").read_text())
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    assert sp.pad_id() == -1  # an id the tokenizer lacks is null in config.json, not -1
    assert cfg["tokenizer"] == {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "pad_token_id": None}
    cfg["format"] = "something-else"
    (tmp_path / "exp" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not a retnet-train export"):
        load_model(out)


def test_model_config_yaml_is_read_as_hydra_reads_it(tmp_path):
    """A preset that trains (Hydra reads `1e-6` as a float) loads as --model-config too."""
    preset = tmp_path / "preset.yaml"
    preset.write_text("".join(f"{k}: {v}\n" for k, v in tiny_config().items() if k != "norm_eps") + "norm_eps: 1e-6\n")
    config = read_model_config(str(preset))
    assert config["norm_eps"] == 1e-6 and model_config_from_dict(config).d_model == 32


def test_deepspeed_options_on_an_export_dir_are_refused_naming_them(tmp_path, tokenizer, capsys):
    out = save_native(tiny_model(), str(tmp_path / "exp"), tokenizer)
    with pytest.raises(CheckpointError, match=f"--tag step_1: {out} is an export directory"):
        load_model(out, tag="step_1")
    with pytest.raises(CheckpointError, match=f"--model-config: {out} is an export directory"):
        load_model(out, model_config=tiny_config(d_model=64))
    preset = tmp_path / "preset.yaml"
    preset.write_text(yaml.safe_dump(tiny_config()))
    gen = ["--checkpoint", out, "--prompt", "one", "--max-new-tokens", "1"]
    with pytest.raises(SystemExit, match="error: --model-config: .* is an export directory"):
        generate_main([*gen, "--model-config", str(preset)])
    with pytest.raises(SystemExit, match="error: --tag latest: .* is an export directory"):
        generate_main([*gen, "--tag", "latest"])
    assert generate_main(gen) == 0 and capsys.readouterr().out.strip()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2])
def test_checkpoint_world_size_two(tmp_path, stage):
    """Two real gloo ranks save a partitioned checkpoint; one process consolidates it.
    (ZeRO-3 over two ranks: test_trained_checkpoint.py, through the real trainer.)"""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    here = os.path.dirname(__file__)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([here, os.path.dirname(os.path.dirname(here)), os.environ.get("PYTHONPATH", "")]),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.join(here, "ds_two_ranks.py"), str(r), port, str(stage), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    tag = (tmp_path / "latest").read_text().strip()
    shards = sorted(f.name for f in (tmp_path / tag).glob("*optim_states.pt"))
    assert len(shards) == 2, shards  # really partitioned over two ranks
    ref = torch.load(tmp_path / "reference.pt")
    loaded = load_model(str(tmp_path))
    for k, v in ref.items():
        torch.testing.assert_close(loaded.model.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_export_cli_from_deepspeed_checkpoint(tmp_path, tokenizer, capsys):
    from retnet_train.inference.export import main as export_main
    from retnet_train.inference.generate import main as generate_main

    cfg = tiny_config()
    ref = write_deepspeed_checkpoint(
        tmp_path / "ckpt", cfg, 2, {"config": {"model": cfg, "data": {"tokenizer": tokenizer}}}
    )
    assert (
        export_main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "exp"), "--dtype", "bfloat16"])
        == 0
    )
    assert "exported native model" in capsys.readouterr().out
    loaded = load_model(str(tmp_path / "exp"))
    assert (tmp_path / "exp" / "tokenizer.model").read_bytes() == open(tokenizer, "rb").read()
    for k, v in ref.state_dict().items():  # bf16 on disk, as asked
        torch.testing.assert_close(loaded.model.state_dict()[k], v.bfloat16().float(), rtol=0, atol=0)
    with pytest.raises(SystemExit, match="not empty"):
        export_main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "exp")])
    with pytest.raises(SystemExit, match="fla export refused: norm=layernorm"):
        export_main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "fla"), "--format", "fla"])
    assert generate_main(["--checkpoint", str(tmp_path / "ckpt"), "--prompt", "one two", "--max-new-tokens", "3"]) == 0


def test_export_of_an_export_keeps_the_training_checkpoint_facts(tmp_path, tokenizer, capsys):
    """Re-exporting an export (to store it in bf16, say) keeps what its config.json says of the training
    checkpoint: evaluate then measures at the trained seq_len and names the weights' tag and step."""
    from retnet_train.inference.evaluate import measured_weights, trained_seq_len
    from retnet_train.inference.export import main as export_main

    cfg = tiny_config()
    client = {"config": {"model": cfg, "data": {"tokenizer": tokenizer, "seq_len": 16}}}
    write_deepspeed_checkpoint(tmp_path / "ckpt", cfg, 0, client, tag="step_00000002")
    assert export_main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "exp")]) == 0
    args = ["--checkpoint", str(tmp_path / "exp"), "--out", str(tmp_path / "exp16"), "--dtype", "bfloat16"]
    assert export_main(args) == 0
    first, second = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("exp", "exp16"))
    assert second["source"] == first["source"]
    assert (second["source"]["tag"], second["source"]["seq_len"]) == ("step_00000002", 16)
    loaded = load_model(str(tmp_path / "exp16"))
    assert trained_seq_len(loaded) == 16
    facts = measured_weights(loaded, str(tmp_path / "exp16"))
    assert (facts["checkpoint_tag"], facts["checkpoint_step"]) == ("step_00000002", 2)


def test_trainer_layout_complete_markers_run_dir_and_relative_tokenizer(tmp_path, tokenizer, monkeypatch):
    """The trainer's layout: <launch>/<run.dir>/checkpoints/step_XXXXXXXX/ with COMPLETE written
    last, `latest` updated after it; resolved config in client_state["config"] with a tokenizer
    path relative to the launch dir."""
    import shutil

    launch = tmp_path / "launch"
    (launch / "data").mkdir(parents=True)
    shutil.copy(tokenizer, launch / "data" / "tok.model")
    cfg = tiny_config()
    resolved = {
        "model": cfg,
        "data": {"tokenizer": "data/tok.model"},
        "run": {"dir": "runs/r1"},
        "checkpoint": {"dir": None},
    }
    save = launch / "runs" / "r1" / "checkpoints"
    first = write_deepspeed_checkpoint(save, cfg, 2, {"config": resolved, "step": 1}, steps=1, tag="step_00000001")
    write_deepspeed_checkpoint(
        save, cfg, 2, {"config": resolved, "step": 2}, steps=2, tag="step_00000002", complete=False
    )
    # the second save was interrupted before COMPLETE, yet DeepSpeed's own `latest` points at it
    assert (save / "latest").read_text().strip() == "step_00000002"
    monkeypatch.chdir(tmp_path)  # not the launch dir: the relative tokenizer path must be recovered
    loaded = load_model(str(launch / "runs" / "r1"))  # the run dir
    assert loaded.meta["tag"] == "step_00000001"
    assert os.path.samefile(loaded.tokenizer_path, launch / "data" / "tok.model")
    for k, v in first.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[k], v, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="step_00000002: no COMPLETE marker"):
        load_model(str(save / "step_00000002"))
    with pytest.raises(CheckpointError, match="step_00000002: no COMPLETE marker"):
        load_model(str(save), tag="step_00000002")


def _split_projections(names_to_values: dict, split) -> dict:
    """Rewrite retention.qkv_proj.weight entries as the three keys written before they were stacked."""
    out = {}
    for key, value in names_to_values.items():
        if key.endswith("retention.qkv_proj.weight"):
            prefix = key[: -len("qkv_proj.weight")]
            out.update({f"{prefix}{p}_proj.weight": part for p, part in zip("qkv", split(value))})
        else:
            out[key] = value
    return out


@pytest.mark.parametrize("stage", [0, 2])
def test_checkpoint_with_separate_projections_loads_but_refuses_resume(tmp_path, tokenizer, stage):
    """A checkpoint written before q/k/v were stacked: its weights load, resuming it is refused
    (stage 0 names the weights in `module`, ZeRO 1-3 in DeepSpeed's `param_shapes`)."""
    from retnet_train.components.checkpoint_discovery import model_states_file
    from retnet_train.components.reshard import plan

    cfg = tiny_config()
    d, vd = cfg["d_model"], 2 * cfg["d_model"]
    client = {"config": {"model": cfg, "data": {"tokenizer": tokenizer}}, "step": 2}
    ref = write_deepspeed_checkpoint(tmp_path / "ckpt", cfg, stage, client)
    tag = (tmp_path / "ckpt" / "latest").read_text().strip()
    states_file = model_states_file(str(tmp_path / "ckpt" / tag))
    state = torch.load(states_file, weights_only=False)
    state["module"] = _split_projections(state["module"], lambda w: w.split([d, d, vd]))
    if state.get("param_shapes"):
        state["param_shapes"] = [
            _split_projections(group, lambda s: [torch.Size([n, s[1]]) for n in (d, d, vd)])
            for group in state["param_shapes"]
        ]
        assert "layers.0.retention.q_proj.weight" in state["param_shapes"][0]
    torch.save(state, states_file)

    if stage == 0:  # ZeRO's flat partitions also hold per-parameter alignment padding: not rewritten here
        loaded = load_model(str(tmp_path / "ckpt"))
        ids = torch.randint(0, VOCAB, (1, 7))
        torch.testing.assert_close(loaded.model(ids).logits, ref(ids).logits)
    current = {"world_size": 1, "zero_stage": stage, "precision": "fp32"}
    with pytest.raises(ValueError, match=f"{tag}.*separate retention q/k/v_proj"):
        plan(str(tmp_path / "ckpt"), tag, current)


def test_a_run_that_has_saved_no_checkpoint_yet_is_named_as_such(tmp_path):
    """A run dir (its config.yaml) with no or an empty checkpoints/: the run has none yet, not 'no model'."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("run: {}\n")
    for _ in range(2):
        with pytest.raises(CheckpointError) as e:
            load_model(str(run))
        assert str(e.value) == f"{run}: a run directory with no checkpoint saved yet (checkpoints/ holds none)"
        (run / "checkpoints").mkdir(exist_ok=True)


def test_a_tag_given_with_one_checkpoint_says_to_name_the_directory_of_them(tmp_path):
    tag_dir = tmp_path / "run" / "checkpoints" / "step_00000200"
    tag_dir.mkdir(parents=True)
    with pytest.raises(CheckpointError) as e:
        load_model(str(tag_dir), tag="300")
    assert str(e.value) == (
        f"--tag 300: {tag_dir} is one checkpoint; with --tag, name the directory that holds the checkpoints "
        f"({tag_dir.parent}) or the run"
    )


def test_relative_tokenizer_of_the_launch_dir_wins_over_one_in_the_current_dir(tmp_path, tokenizer, monkeypatch):
    """A relative data.tokenizer is the launch dir's (recovered from run.dir), even where the current
    directory holds another tokenizer of the same size under that path: token ids must keep their pieces."""
    import shutil

    launch, elsewhere = tmp_path / "launch", tmp_path / "elsewhere"
    (launch / "data").mkdir(parents=True)
    (elsewhere / "data").mkdir(parents=True)
    shutil.copy(tokenizer, launch / "data" / "tok.model")
    other = train_tokenizer(tmp_path, model_type="bpe")  # same size, other pieces
    shutil.copy(other, elsewhere / "data" / "tok.model")
    cfg = tiny_config()
    resolved = {"model": cfg, "data": {"tokenizer": "data/tok.model"}, "run": {"dir": "runs/r1"}}
    write_deepspeed_checkpoint(launch / "runs" / "r1" / "checkpoints", cfg, 0, {"config": resolved}, steps=1)
    monkeypatch.chdir(elsewhere)
    loaded = load_model(str(launch / "runs" / "r1"))
    assert os.path.samefile(loaded.tokenizer_path, launch / "data" / "tok.model")


def test_stored_tokenizer_not_found_says_how_to_go_on(tmp_path, monkeypatch):
    """A relative data.tokenizer that cannot be found from here (run.dir absolute: no launch dir to recover)
    is an error naming the path and the ways on: the launch dir, or --tokenizer."""
    cfg = tiny_config()
    run = tmp_path / "run"
    resolved = {"model": cfg, "data": {"tokenizer": "data/tok.model"}, "run": {"dir": str(run)}}
    write_deepspeed_checkpoint(run / "checkpoints", cfg, 0, {"config": resolved}, steps=1)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"data/tok.model does not exist \(relative to .*launched.*--tokenizer"):
        load_model(str(run))
