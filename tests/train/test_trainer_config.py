"""Config errors fail at start naming the key; derived values; the experiments compose."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainer_helpers import REPO, env, overrides, train

from retnet_train.components.config import (
    TrainConfig,
    check_values,
    checkpointing_mode,
    data_sources,
    grad_accumulation,
)
from retnet_train.components.optim import deepspeed_config


@pytest.mark.parametrize(
    "override,needle",
    [
        ("train.max_step=3", "max_step"),
        ("optim.lr=fast", "optim.lr"),
        ("deepspeed.zero_stage=7", "deepspeed.zero_stage"),
        ("model.n_layer=2", "model.n_layer"),
        ("train.global_batch_tokens=1000", "train.global_batch_tokens"),
    ],
)
def test_bad_override_names_the_key(tmp_path, override, needle):
    args = overrides(tmp_path / "nodata", tmp_path / "run") + [override]
    proc = train(args, nproc=1, check=False, timeout=120)
    assert proc.returncode != 0
    assert needle in proc.stderr + proc.stdout


def test_help_says_how_to_run_and_lists_every_experiment(tmp_path):
    """--help gave Hydra's generic text ('Powered by Hydra', the compose flags): nothing on what the
    trainer takes, where its keys are documented or which experiments exist."""
    proc = subprocess.run(
        [sys.executable, "-m", "retnet_train.train", "--help"],
        cwd=tmp_path,
        env={**env(), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and list(tmp_path.iterdir()) == []
    assert proc.stdout.startswith("python -m retnet_train.train [experiment=NAME]")
    assert "docs/training.md" in proc.stdout and "Powered by Hydra" not in proc.stdout
    listed = next(line for line in proc.stdout.splitlines() if line.startswith("experiment: "))
    experiments = sorted(p.stem for p in (REPO / "configs" / "experiment").glob("*.yaml"))
    assert listed == "experiment: " + ", ".join(experiments)


@pytest.mark.parametrize("flag", ["-m", "--multirun", "--multi", "--m", "hydra.mode=MULTIRUN", "+hydra.mode=multirun"])
def test_hydra_multirun_is_refused_before_anything_is_written(tmp_path, flag):
    """A sweep (-m optim.lr=a,b) ran its first job only, with status 0: the trainer ends the process with
    the run's exit status, so the other jobs never ran; and Hydra wrote multirun/<date>/<time>/."""
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    args = [flag, *overrides(tmp_path / "nodata", tmp_path / "run", **{"optim.lr": "1e-3,3e-3"})]
    proc = subprocess.run(
        [sys.executable, "-m", "retnet_train.train", *args],
        cwd=workdir,
        env={**env(), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == (
        "error: Hydra multirun (-m, --multirun, hydra.mode=MULTIRUN) is not supported: the trainer runs one "
        "config per process and exits with its status; start one command per config, each with its own run.dir"
    )
    assert list(workdir.iterdir()) == [] and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "override,key,hint",
    [
        ("+train.max_step=2", "train.max_step", "; did you mean train.max_steps?"),
        ("+wandb.projekt=x", "wandb.projekt", "; did you mean wandb.project?"),
        ("+trian.max_steps=2", "trian", "; did you mean train?"),
        ("+train.zzz=2", "train.zzz", ""),
    ],
)
def test_unknown_plus_key_is_refused_like_a_misspelled_one(tmp_path, override, key, hint):
    """`+key=value` (Hydra's own suggestion for a misspelled key) adds a key nothing reads: refused by
    the CLI's conversion to the typed config, and by the preflight that composes as the CLI does."""
    from retnet_train.components.typed_config import typed_config
    from retnet_train.preflight import compose_trainer_config
    from retnet_train.preflight.trainer_config import PreflightError, trainer_view

    composed = compose_trainer_config(overrides(tmp_path, tmp_path / "run") + [override])
    with pytest.raises(ValueError) as exc:
        typed_config(composed)
    assert str(exc.value) == (
        f"{key}: not a key of the trainer config (retnet_train/components/config.py); nothing would read it{hint}"
    )
    with pytest.raises(PreflightError, match=f"{key}: not a key of the trainer config"):
        trainer_view(composed, world_size=1)
    assert typed_config(compose_trainer_config(overrides(tmp_path, tmp_path / "run"))).train.max_steps == 6


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, error, copies",
    [
        ("train.max_step=3", "Could not override 'train.max_step'.", 1),  # Hydra's, composing the config
        ("+train.max_step=3", "error: train.max_step: not a key of the trainer config", 1),
        # the batch does not divide over this world size: the config's fault, the same on every rank
        ("train.global_batch_tokens=384", "error: train.global_batch_tokens=384 is not a multiple", 1),
        (None, "error: data.paths[0]=", 2),  # each rank's own data: every rank says what it found
    ],
)
def test_an_error_every_rank_shares_is_printed_once(tmp_path, override, error, copies):
    """2 ranks under torchrun: a config error, the same on every rank, in full from rank 0 and one line
    from rank 1; an error of a rank's own inputs in full from each rank that met it."""
    args = overrides(tmp_path / "nodata", tmp_path / "run") + ([override] if override else [])
    proc = train(args, nproc=2, check=False, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert output.count(error) == copies, output
    pointer = "error: rank 1: the same error as rank 0, which prints it"
    assert output.count(pointer) == (1 if copies == 1 else 0), output


@pytest.mark.slow
def test_a_rank_0_that_starts_late_still_prints_the_shared_error(tmp_path):
    """torchrun stops every rank once one has exited: rank 1, which only points at rank 0's message, leaves
    after rank 0, so a rank 0 that starts 2 s late (a slow node, say) is not stopped before it prints it."""
    late = tmp_path / "late_rank_0.sh"
    late.write_text(f'#!/bin/sh\n[ "$RANK" = 0 ] && sleep 2\nexec {sys.executable} -m retnet_train.train "$@"\n')
    late.chmod(0o755)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python"]
    args = overrides(tmp_path / "nodata", tmp_path / "run") + ["+train.max_step=3"]
    proc = subprocess.run(
        [*torchrun, str(late), *args], cwd=REPO, env=env(), capture_output=True, text=True, timeout=120
    )
    output = proc.stdout + proc.stderr
    full = output.count("error: train.max_step: not a key of the trainer config")
    pointer = output.count("error: rank 1: the same error as rank 0, which prints it")
    # rank 0's message is never lost; rank 1 points at it, or prints it too where rank 0 was slower than
    # its wait (a loaded machine): one line from rank 1 either way
    assert full >= 1 and full + pointer == 2, output


def test_a_gpu_retention_backend_on_cpu_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    """model.retention_backend=triton on a CPU run was refused only at the first forward, after the engine
    was built and the run directory written."""
    from trainer_helpers import typed

    from retnet_train.trainer import Trainer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = typed(tmp_path / "nodata", tmp_path / "run", **{"model.retention_backend": "triton"})
    with pytest.raises(ValueError) as exc:
        Trainer(cfg).build()
    assert str(exc.value) == (
        "model.retention_backend=triton needs a CUDA or ROCm device, and train.device=cpu: "
        "model.retention_backend=auto or torch run on CPU"
    )
    assert not (tmp_path / "run").exists()


def test_missing_data_names_the_path(tmp_path):
    proc = train(overrides(tmp_path / "nodata", tmp_path / "run"), nproc=1, check=False, timeout=120)
    assert proc.returncode != 0
    assert str(tmp_path / "nodata") in proc.stderr + proc.stdout


def test_derived_values_and_sources():
    cfg = TrainConfig()
    cfg.data.paths, cfg.data.weights = ["/d/web", "/e/web", "/d/code/"], [0.5, 0.3, 0.2]
    cfg.data.seq_len, cfg.train.micro_batch_size, cfg.train.global_batch_tokens = 8192, 1, 4 * 2**20
    check_values(cfg)
    assert grad_accumulation(cfg, 8) == 64
    assert data_sources(cfg) == {"web": ("/d/web", 0.5), "web_": ("/e/web", 0.3), "code": ("/d/code/", 0.2)}
    ds = deepspeed_config(cfg, 64, world_size=8)
    assert ds["gradient_accumulation_steps"] == 64 and ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 1
    # overlap_comm hides the gradient reduction; one rank has none (it would cost a stream sync and a bucket)
    assert ds["zero_optimization"]["overlap_comm"] is True
    assert deepspeed_config(cfg, 64, world_size=1)["zero_optimization"]["overlap_comm"] is False
    cfg.data.weights = [1.0]
    with pytest.raises(ValueError, match="data.weights"):
        check_values(cfg)


def test_context_parallel_ranks_share_their_micro_batches():
    """The P ranks of a context-parallel group hold parts of the same sequences: the batch counts
    world / P data-parallel ranks, so 8 ranks at P=2 accumulate as 4 ranks without it."""
    cfg = TrainConfig()
    cfg.model = {"arch": "retnet"}
    cfg.data.seq_len, cfg.train.micro_batch_size, cfg.train.global_batch_tokens = 8192, 1, 4 * 2**20
    cfg.parallel.context_parallel_size = 2
    assert grad_accumulation(cfg, 8) == 128
    cfg.parallel.context_parallel_size = 1
    assert grad_accumulation(cfg, 4) == 128


def test_bf16_mixed_is_deepspeeds_torch_autocast_with_fp32_weights():
    """fp32 weights (DeepSpeed's bf16 off), autocast to bf16, gradients reduced in fp32 (no module listed as
    lower-precision safe); at ZeRO 0 GuardedAdamW clips as under fp32; a checkpoint holds what fp32's does."""
    from retnet_train.components.optim import uses_guarded_adamw
    from retnet_train.components.reshard import stored_precision

    cfg = TrainConfig()
    cfg.data.paths, cfg.deepspeed.precision = ["/d/web"], "bf16-mixed"
    check_values(cfg)
    ds = deepspeed_config(cfg, 4, world_size=2)
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert "torch_autocast" not in deepspeed_config(TrainConfig(), 4, world_size=2)
    cfg.deepspeed.zero_stage = 0
    assert uses_guarded_adamw(cfg) and deepspeed_config(cfg, 4, world_size=1)["gradient_clipping"] == 0.0
    assert stored_precision("bf16-mixed") == stored_precision("fp32") == "fp32" != stored_precision("bf16")
    cfg.deepspeed.grad_accum_dtype = "fp32"  # its gradients are fp32 already
    check_values(cfg)
    cfg.deepspeed.precision = "bf16_mixed"
    with pytest.raises(ValueError, match=r"deepspeed.precision: 'bf16_mixed' is not bf16\|bf16-mixed\|fp16\|fp32"):
        check_values(cfg)


def test_activation_checkpointing_modes():
    assert [checkpointing_mode(v) for v in ("True", "false", "selective", "FULL", "none", True, False)] == [
        "full",
        "none",
        "selective",
        "full",
        "none",
        "full",
        "none",
    ]
    with pytest.raises(ValueError, match="train.activation_checkpointing: 'some' is not one of"):
        checkpointing_mode("some", "train.activation_checkpointing")
    cfg = TrainConfig()
    cfg.data.paths = ["/d/web"]
    cfg.train.activation_checkpointing = "partial"
    with pytest.raises(ValueError, match="train.activation_checkpointing"):
        check_values(cfg)
    cfg.train.activation_checkpointing = "none"
    for budget, compile_ in ((0.0, True), (1.5, True), (0.8, False)):
        cfg.train.activation_memory_budget, cfg.train.compile = budget, compile_
        with pytest.raises(ValueError, match="train.activation_memory_budget"):
            check_values(cfg)
    cfg.train.activation_memory_budget, cfg.train.compile = 0.8, True
    check_values(cfg)


def test_wandb_offline_run_is_continued_after_resume(tmp_path):
    from trainer_helpers import make_shards

    shards = make_shards(tmp_path / "shards")
    run_dir = tmp_path / "run"
    base = overrides(shards, run_dir, **{"wandb.mode": "offline", "train.max_steps": 2, "checkpoint.interval": 2})
    train(base, nproc=1)
    first = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    client = torch.load(run_dir / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt", weights_only=False)
    run_id = client["train_state"]["wandb_id"]
    assert len(first) == 1 and first[0].endswith(run_id)
    proc = train(
        overrides(shards, run_dir, **{"wandb.mode": "offline", "train.max_steps": 4, "checkpoint.interval": 2})
        + ["--local_rank=0"],
        nproc=1,
    )  # as the deepspeed launcher appends it
    assert "resumed from" in proc.stdout
    assert "config changed since that checkpoint: train.max_steps: 2 -> 4" in proc.stdout
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert all(name.endswith(run_id) for name in runs)  # the same W&B run id continues
    # a run started from this one's checkpoint is another W&B run (it would otherwise log into this one)
    branch = tmp_path / "branch"
    base = overrides(shards, branch, **{"wandb.mode": "offline", "train.max_steps": 6, "checkpoint.interval": 2})
    train([*base, f"train.resume={run_dir}"], nproc=1)
    branched = [p.name for p in (branch / "wandb").glob("offline-run-*")]
    assert len(branched) == 1 and not branched[0].endswith(run_id)


def test_selective_checkpointing_run_without_final_save(short_run):
    """A one-process run with selective activation checkpointing trains; save_at_end=false
    leaves no checkpoint behind (benchmark runs), while the default would write one."""
    from trainer_helpers import records

    run, proc = short_run  # also the profiled run of test_profiling.py
    assert [r["step"] for r in records(run) if "loss" in r] == [1, 2, 3]
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
    assert proc.stdout.splitlines()[-1] == (
        f"done at step 3: metrics in {run / 'metrics.jsonl'}, no checkpoint saved (checkpoint.save_at_end=false)"
    )


EXPERIMENTS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "configs" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_preset_composes_and_validates(name):
    """A preset's key typo or bad value fails here, not hours into a cluster job."""
    from omegaconf import OmegaConf

    from retnet_train.preflight import compose_trainer_config

    cfg = OmegaConf.to_object(compose_trainer_config([f"experiment={name}"]))
    check_values(cfg)
    if cfg.train.compile and cfg.train.activation_checkpointing == "none":
        assert cfg.train.activation_memory_budget < 1  # measured free on an H200 (docs/benchmarks.md)


def test_a_batch_that_does_not_divide_names_settings_that_would():
    """tiny_cpu's 8 x 256 on 2 ranks is 4,096 tokens a micro-batch round, above its 2,048-token step."""
    cfg = TrainConfig()
    cfg.data.seq_len, cfg.train.micro_batch_size, cfg.train.global_batch_tokens = 256, 8, 2048
    with pytest.raises(ValueError) as e:
        grad_accumulation(cfg, 2)
    assert str(e.value) == (
        "train.global_batch_tokens=2048 is not a multiple of micro_batch_size x seq_len x data-parallel world = "
        "8 x 256 x 2 = 4096: train.micro_batch_size=4 or train.global_batch_tokens=4096 would be"
    )
    cfg.data.seq_len = 3000  # no micro-batch fits: only the step's size
    with pytest.raises(ValueError, match="= 24000: train.global_batch_tokens=24000 would be$"):
        grad_accumulation(cfg, 1)
