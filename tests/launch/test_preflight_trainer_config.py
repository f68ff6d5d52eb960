"""retnet_train.preflight and the trainer's composed config: the problems it finds before the
launch, the checkpoint dir and size it gives, and the options the checks fall back to without it."""

from __future__ import annotations

import pytest
from file_damage import corrupt_member
from preflight_helpers import tiny_params

from retnet_train import preflight as pf
from retnet_train.preflight import cli as preflight_cli


def test_trainer_config_problems_fail_before_launch(tmp_path, capsys):
    # What the trainer would only find out after the queue: batch arithmetic for this world size, a
    # missing tokenizer, and a --checkpoint-dir the trainer will not write to.
    rc = pf.main(
        [
            "--nproc-per-node",
            "3",
            "--checkpoint-dir",
            str(tmp_path / "elsewhere"),
            "--",
            "experiment=tiny_cpu",
            f"run.dir={tmp_path / 'run'}",
            "data.tokenizer=/no/such.model",
            "--cfg",
            "job",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 1
    assert "trainer config: train.global_batch_tokens=2048 is not a multiple of" in err and "(world size 3)" in err
    assert "trainer config: data.tokenizer=/no/such.model: no such file" in err
    assert (
        f"--checkpoint-dir {tmp_path / 'elsewhere'} but the trainer will write checkpoints to "
        f"{tmp_path / 'run' / 'checkpoints'}"
    ) in err and f"checkpoint.dir={tmp_path / 'elsewhere'}" in err


def test_trainer_config_gives_checkpoint_dir_and_size(tmp_path, capsys):
    rc = pf.main(["--", "experiment=tiny_cpu", f"run.dir={tmp_path / 'run'}", "checkpoint.keep_last=4"])
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    n = tiny_params()
    assert f"checkpoint dir {tmp_path / 'run' / 'checkpoints'} is writable" in out
    assert f"{n / 1e6:.3g}M params (trainer config) x 16 B/param x 5 checkpoint(s)" in out
    assert pf.hydra_overrides(["-m", "a=1", "--cfg", "job", "-p", "x", "b=2"]) == ["a=1", "b=2"]


# ---------------------------------------------------------------- what the checks fall back to


def test_options_only_without_a_checkpoint_dir(capsys):
    assert pf.main(["--no-config", "--params", "1e6"]) == 0
    out = capsys.readouterr().out
    assert "[warn] no --checkpoint-dir: writable/shared/free-space checks skipped" in out
    assert "trainer config" not in out


def test_checkout_without_a_trainer_config_warns_and_uses_the_options(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(preflight_cli, "compose_trainer_config", lambda overrides: None)
    assert pf.main(["--checkpoint-dir", str(tmp_path), "--params", "1e6", "--keep-checkpoints", "3"]) == 0
    out = capsys.readouterr().out
    assert (
        "[warn] no trainer config in this checkout (configs/config.yaml): checkpoint dir and model from options only"
    ) in out
    assert f"[  ok] disk: 1M params (--params) x 16 B/param x 3 checkpoint(s) = 45.8 MiB; free on {tmp_path}" in out


def test_unknown_trainer_config_layout_falls_back_to_the_options(tmp_path, monkeypatch, capsys):
    def moved(cfg, world_size, node_rank):
        raise AttributeError("'TrainConfig' object has no attribute 'checkpoint'")

    monkeypatch.setattr(preflight_cli, "trainer_view", moved)
    assert pf.main(["--checkpoint-dir", str(tmp_path), "--", "model=tiny"]) == 0
    out, err = capsys.readouterr()
    assert (
        "preflight: warning: trainer config layout not understood ('TrainConfig' object has no attribute "
        "'checkpoint'); checks use the options only"
    ) in err
    assert "[warn] no trainer config in this checkout" in out
    n = tiny_params()
    assert f"{n / 1e6:.3g}M params (configs/model/tiny.yaml) x 16 B/param x 2 checkpoint(s)" in out


def test_what_the_trainer_refuses_at_start_fails_the_preflight(tmp_path, capsys):
    """run.dir not writable, a train.resume with no checkpoint, train.resume=never over checkpoints and a
    missing train.init_weights: the trainer refuses each at start, after the queue wait."""
    (tmp_path / "file").write_text("")
    old = tmp_path / "old" / "checkpoints" / "step_00000010"
    old.mkdir(parents=True)
    runs = {
        "run.dir": [f"run.dir={tmp_path / 'file' / 'run'}", f"checkpoint.dir={tmp_path / 'ckpt'}"],
        "resume": [f"run.dir={tmp_path / 'run'}", f"train.resume={tmp_path / 'nothing'}"],
        "never": [f"run.dir={tmp_path / 'old'}", "train.resume=never"],
        "init": [f"run.dir={tmp_path / 'run'}", f"train.init_weights={tmp_path / 'no_export'}"],
    }
    errors = {}
    for name, overrides in runs.items():
        assert pf.main(["--", "experiment=tiny_cpu", *overrides]) == 1, name
        errors[name] = capsys.readouterr().err
    assert (
        f"trainer config: run.dir: {tmp_path / 'file' / 'run'} lies under {tmp_path / 'file'}, which is a file"
        in (errors["run.dir"])
    )
    assert f"trainer config: train.resume={tmp_path / 'nothing'}: no complete checkpoint there" in errors["resume"]
    assert f"trainer config: train.resume=never but {tmp_path / 'old' / 'checkpoints'} already holds" in errors["never"]
    assert f"trainer config: train.init_weights={tmp_path / 'no_export'}: no such file or directory" in errors["init"]
    assert pf.main(["--", "experiment=tiny_cpu", f"run.dir={tmp_path / 'old'}"]) == 0  # auto: no complete one, fresh


def test_fp16_on_cpu_fails_the_preflight(tmp_path, monkeypatch, capsys):
    """train.device=cpu (experiment=tiny_cpu), or auto on a node without a GPU: the trainer refuses fp16
    before it builds anything."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = ["experiment=tiny_cpu", f"run.dir={tmp_path / 'run'}"]
    assert pf.main(["--", *run, "deepspeed.precision=fp16"]) == 1
    assert "trainer config: deepspeed.precision=fp16 needs a GPU, and train.device=cpu: " in capsys.readouterr().err
    assert pf.main(["--", *run, "deepspeed.precision=fp16", "train.device=auto"]) == 1
    assert "deepspeed.precision=fp16 needs a GPU, and none is visible (train.device=auto)" in capsys.readouterr().err
    assert pf.main(["--", *run, "deepspeed.precision=bf16"]) == 0


def test_a_gpu_retention_backend_on_cpu_fails_the_preflight(tmp_path, monkeypatch, capsys):
    """model.retention_backend=triton where the run trains on the CPU: the trainer refuses it at start."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = ["experiment=tiny_cpu", f"run.dir={tmp_path / 'run'}", "model.retention_backend=triton"]
    assert pf.main(["--", *run]) == 1
    assert (
        "trainer config: model.retention_backend=triton needs a CUDA or ROCm device, and train.device=cpu: "
        "model.retention_backend=auto or torch run on CPU"
    ) in capsys.readouterr().err
    assert pf.main(["--", *run, "train.device=auto"]) == 1
    assert "triton needs a CUDA or ROCm device, and none is visible (train.device=auto)" in capsys.readouterr().err
    assert pf.main(["--", *run[:-1], "model.retention_backend=torch"]) == 0


def test_megatron_datasets_alone_fail_the_preflight(tmp_path, capsys):
    for suffix in (".bin", ".idx"):
        (tmp_path / f"pile{suffix}").write_bytes(b"")
    assert (
        pf.main(["--", "experiment=tiny_cpu", f"run.dir={tmp_path / 'run'}", f"data.paths=[{tmp_path / 'pile'}]"]) == 1
    )
    err = capsys.readouterr().err
    assert f"trainer config: data.paths: {tmp_path / 'pile'} is a Megatron dataset, which records neither" in err
    assert "1 problem(s):" in err  # reported once, by the trainer's data loader check


def test_profile_ranks_outside_the_world_fail_the_preflight(tmp_path, capsys):
    """The trainer refuses them only once its checkpoint is loaded."""
    run = [f"run.dir={tmp_path / 'run'}", "profile.enabled=true", "profile.ranks=[0,2]"]
    assert pf.main(["--nproc-per-node", "2", "--", "experiment=tiny_cpu", "train.micro_batch_size=4", *run]) == 1
    assert "trainer config: profile.ranks: [0, 2] not all within this run's ranks 0-1" in capsys.readouterr().err
    assert pf.main(["--nproc-per-node", "4", "--", "experiment=tiny_cpu", "train.micro_batch_size=2", *run]) == 0


def test_the_world_size_checked_is_every_nodes_processes(monkeypatch):
    """The batch arithmetic and profiled ranks are checked for nnodes x nproc-per-node ranks, on this node's
    rank; without --nproc-per-node the world size is unknown (None)."""
    seen = []
    monkeypatch.setattr(preflight_cli, "compose_trainer_config", lambda overrides: "cfg")
    monkeypatch.setattr(preflight_cli, "trainer_view", lambda cfg, world, rank: seen.append((cfg, world, rank)))
    parse = pf.build_parser().parse_args
    preflight_cli._trainer_view(parse(["--nnodes", "4", "--node-rank", "3", "--nproc-per-node", "8"]), [])
    preflight_cli._trainer_view(parse(["--nnodes", "2"]), [])
    assert seen == [("cfg", 32, 3), ("cfg", None, 0)]


def test_run_dir_is_checked_on_the_node_of_rank_0_alone(tmp_path):
    """Only rank 0 writes run.dir (config.yaml, metrics): it may lie on node 0's own disk, which the
    other nodes do not have; checkpoint.dir is what every node writes."""
    (tmp_path / "file").write_text("")
    cfg = pf.compose_trainer_config(
        ["experiment=tiny_cpu", f"run.dir={tmp_path / 'file' / 'run'}", f"checkpoint.dir={tmp_path / 'ckpt'}"]
    )
    problem = f"run.dir: {tmp_path / 'file' / 'run'} lies under {tmp_path / 'file'}, which is a file, not a directory"
    assert problem in pf.trainer_view(cfg, world_size=None, node_rank=0).problems
    assert pf.trainer_view(cfg, world_size=None, node_rank=1).problems == []


def test_a_batch_no_world_size_divides_fails_without_nproc_per_node(tmp_path):
    """Without --nproc-per-node the world size is unknown, but a batch that one data-parallel rank's
    micro-batches do not divide fails at every size: the trainer refuses it at start."""
    run = ["experiment=tiny_cpu", f"run.dir={tmp_path / 'run'}"]
    cfg = pf.compose_trainer_config([*run, "train.global_batch_tokens=1000"])
    assert pf.trainer_view(cfg, world_size=None).problems == [
        "train.global_batch_tokens=1000 is not a multiple of micro_batch_size x seq_len x data-parallel world = "
        "8 x 256 x 1 = 2048: train.global_batch_tokens=2048 would be (at any world size; --nproc-per-node checks "
        "this one)"
    ]
    assert pf.trainer_view(pf.compose_trainer_config(run), world_size=None).problems == []


@pytest.mark.parametrize(
    "override, problem",
    [
        # the value checks and the batch arithmetic both check the context-parallel layout
        (
            "parallel.context_parallel_size=3",
            "parallel.context_parallel_size=3 does not divide data.seq_len=256: each rank holds seq_len / 3 tokens",
        ),
        # the batch arithmetic divided by zero (a traceback, with --nproc-per-node as the launch scripts pass it)
        ("data.seq_len=0", "data.seq_len: must be > 0"),
        ("train.micro_batch_size=0", "train.micro_batch_size: must be > 0"),
    ],
)
def test_a_value_the_batch_reads_is_named_once_by_the_value_checks(tmp_path, override, problem):
    cfg = pf.compose_trainer_config(["experiment=tiny_cpu", f"run.dir={tmp_path / 'run'}", override])
    for world in (None, 3):
        assert pf.trainer_view(cfg, world_size=world).problems == [problem], world


def _zero0_checkpoint(tmp_path):
    """A complete checkpoint of the tiny model written at ZeRO 0 by one rank; its tag dir and model."""
    import torch
    import yaml

    from retnet_train.components.checkpoint_discovery import COMPLETE

    tag = tmp_path / "run" / "checkpoints" / "step_00000010"
    tag.mkdir(parents=True)
    model = yaml.safe_load(open("configs/model/tiny.yaml"))
    layout = {"world_size": 1, "zero_stage": 0, "precision": "fp32"}
    torch.save({"module": {}, "layout": layout, "config": {"model": model}}, tag / "mp_rank_00_model_states.pt")
    (tag / COMPLETE).touch()
    return tag, model


def test_a_resume_the_trainer_would_refuse_fails_the_preflight(tmp_path, capsys):
    """The newest checkpoint written at ZeRO 0 by one rank: another ZeRO stage, or model settings that
    change what its weights compute, are refused here as the trainer refuses them after the queue."""
    tag, model = _zero0_checkpoint(tmp_path)
    run = ["--nproc-per-node", "1", "--", "experiment=tiny_cpu", f"run.dir={tmp_path / 'run'}"]
    assert pf.main(run) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert pf.main([*run, "deepspeed.zero_stage=1"]) == 1
    assert f"trainer config: train.resume: {tag} was written with deepspeed.zero_stage=0" in capsys.readouterr().err
    assert pf.main([*run, f"model.n_heads={model['n_heads'] * 2}"]) == 1
    assert f"{tag} was trained with other model settings (model.n_heads:" in capsys.readouterr().err


def test_the_resume_check_reads_the_model_states_once(tmp_path, monkeypatch, capsys):
    """Without a world size the checkpoint's own is assumed: the layout and the resume plan share one read
    of its model-states file (large for a ZeRO 0 checkpoint: it holds the weights and optimizer state)."""
    import torch

    tag, _ = _zero0_checkpoint(tmp_path)
    reads, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **kw: reads.append(str(f)) or load(f, *a, **kw))
    assert pf.main(["--", "experiment=tiny_cpu", f"run.dir={tmp_path / 'run'}"]) == 0, capsys.readouterr().err
    assert reads.count(str(tag / "mp_rank_00_model_states.pt")) == 1


def _save_legacy(path):
    import torch

    torch.save(torch.load(path, weights_only=False), path, _use_new_zipfile_serialization=False)


@pytest.mark.parametrize(
    "damage, shown",
    [
        (lambda path: corrupt_member(path, "data.pkl"), "damaged (its member mp_rank_00_model_states/data.pkl is"),
        (_save_legacy, "in torch's legacy (non-zip) format, which cannot be memory-mapped; torch.save it again"),
    ],
)
def test_a_model_states_file_torch_cannot_read_fails_the_check_naming_it(tmp_path, capsys, damage, shown):
    """The checkpoint the run would resume, its model-states file damaged inside (or in a format torch cannot
    memory-map): a failed check naming the file in the trainer's words, not a traceback."""
    tag, _ = _zero0_checkpoint(tmp_path)
    damage(tag / "mp_rank_00_model_states.pt")
    assert pf.main(["--nproc-per-node", "1", "--", "experiment=tiny_cpu", f"run.dir={tmp_path / 'run'}"]) == 1
    err = capsys.readouterr().err
    assert f"trainer config: train.resume: {tag / 'mp_rank_00_model_states.pt'}: {shown}" in err
    assert "Traceback" not in err


def test_a_model_states_file_that_cannot_be_opened_fails_the_check_naming_it(tmp_path, monkeypatch, capsys):
    """A whole file the node cannot open (no permission, a mount gone): torch's I/O error, named."""
    import torch

    tag, _ = _zero0_checkpoint(tmp_path)
    path = str(tag / "mp_rank_00_model_states.pt")

    def refuse(f, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(f))

    monkeypatch.setattr(torch, "load", refuse)
    assert pf.main(["--nproc-per-node", "1", "--", "experiment=tiny_cpu", f"run.dir={tmp_path / 'run'}"]) == 1
    err = capsys.readouterr().err
    assert f"trainer config: train.resume: {tag}: cannot be read ([Errno 13] Permission denied: '{path}')" in err


def test_a_resume_with_other_weight_decay_groups_fails_the_preflight(tmp_path, capsys):
    """optim.no_decay_embeddings changed since the checkpoint: refused here as the trainer refuses it."""
    import torch

    tag, model = _zero0_checkpoint(tmp_path)
    state = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)
    state["config"]["optim"] = {"no_decay_embeddings": True}
    torch.save(state, tag / "mp_rank_00_model_states.pt")
    run = ["--nproc-per-node", "1", "--", "experiment=tiny_cpu", f"run.dir={tmp_path / 'run'}"]
    assert pf.main(run) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert pf.main([*run, "optim.no_decay_embeddings=false"]) == 1
    assert f"{tag} was trained with optim.no_decay_embeddings=True, this run has False" in capsys.readouterr().err


def test_the_world_size_checked_is_the_jobs_total_where_nodes_differ(monkeypatch):
    """--world-size (the launch's total, e.g. 8 + 4 GPUs) is the world the batch is checked for, not
    nnodes x this node's processes."""
    seen = []
    monkeypatch.setattr(preflight_cli, "compose_trainer_config", lambda overrides: "cfg")
    monkeypatch.setattr(preflight_cli, "trainer_view", lambda cfg, world, rank: seen.append((world, rank)))
    parse = pf.build_parser().parse_args
    args = parse(["--nnodes", "2", "--node-rank", "1", "--nproc-per-node", "4", "--world-size", "12"])
    preflight_cli._trainer_view(args, [])
    assert seen == [(12, 1)]
