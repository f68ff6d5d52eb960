"""Run the real trainer (python -m retnet_train.train, under torchrun for 2 ranks) on tiny data:
one run per launch (train, start), or several runs per launch (run_scenarios)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

TESTS = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(TESTS / "data"), str(TESTS)]
from process_tree import descendants, running  # noqa: E402
from shard_fixtures import learnable_tokens, write_shard_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
VOCAB = 512


def make_shards(directory: Path) -> Path:
    """learnable_tokens' corpus, 50,000 training and 10,000 validation tokens."""
    toks = learnable_tokens(60_000, VOCAB)
    write_shard_dir(directory, toks[:50_000], toks[50_000:], shard_tokens=8192, vocab_size=VOCAB)
    return directory


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """make_shards' corpus, once per test module (import this fixture into the module)."""
    return make_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="session")
def short_run(tmp_path_factory):
    """(run dir, CompletedProcess) of one 1-rank CLI run of 3 steps shared by test_trainer_config
    (selective activation checkpointing, checkpoint.save_at_end=false) and test_profiling (the
    profiled window of steps 2-3): a launch costs ~9 s of start-up, the 3 steps well under one.
    Registered in conftest.py, so that both modules get the same run."""
    root = tmp_path_factory.mktemp("short_run")
    run = root / "run"
    proc = train(
        overrides(
            make_shards(root / "shards"),
            run,
            **{
                "train.max_steps": 3,
                "train.activation_checkpointing": "selective",
                "checkpoint.save_at_end": "false",
                "profile.enabled": "true",
                "profile.start_step": 2,
                "profile.steps": 2,
            },
        ),
        nproc=1,
    )
    return run, proc


@pytest.fixture
def process_group():
    """A world of one on an in-memory store for trainers run in this process: no TCP port, and no
    RANK/MASTER_* variables left for later subprocesses. Left up, with LOCAL_RANK, for later
    in-process tests, which join it."""
    import torch.distributed as dist

    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine insists on it
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def typed(data_dir: Path, run_dir: Path, **extra):
    """The TrainConfig the CLI would run for overrides(data_dir, run_dir, **extra)."""
    from retnet_train.components.typed_config import typed_config
    from retnet_train.preflight import compose_trainer_config

    return typed_config(compose_trainer_config(overrides(data_dir, run_dir, **extra)))


def overrides(data_dir: Path, run_dir: Path, **extra) -> list:
    base = {
        "model": "tiny",
        "model.vocab_size": VOCAB,
        "model.d_model": 64,
        "model.n_layers": 2,
        "model.n_heads": 2,
        "model.ffn_dim": 128,
        "model.chunk_size": 16,
        "data.paths": f"[{data_dir}]",
        "data.tokenizer": "null",
        "data.seq_len": 64,
        "train.micro_batch_size": 2,
        "train.global_batch_tokens": 256,
        "train.max_steps": 6,
        "train.device": "cpu",
        "train.log_interval": 1,
        "train.eval_interval": 1000,
        "train.eval_batches": 2,
        "optim.lr": 3e-3,
        "optim.warmup_steps": 2,
        "optim.decay": "constant",
        "deepspeed.precision": "fp32",
        "deepspeed.zero_stage": 0,
        "checkpoint.interval": 1000,
        "checkpoint.keep_last": 2,
        "run.dir": str(run_dir),
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def env() -> dict:
    """This process's environment minus any torch.distributed variables an in-process test left."""
    base = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    return {**base, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def command(args: list, nproc: int) -> list:
    if nproc == 1:
        return [sys.executable, "-m", "retnet_train.train", *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "retnet_train.train",
        *args,
    ]


def train(args: list, nproc: int = 2, check: bool = True, timeout: int = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(args, nproc), cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def start(args: list, nproc: int = 2) -> subprocess.Popen:
    return subprocess.Popen(
        command(args, nproc),
        cwd=REPO,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def signal_run(proc: subprocess.Popen, sig: int) -> list:
    """sig to a launch started by start() and to every process below it (a scheduler signals the whole
    job); returns those processes."""
    below = descendants(proc.pid)
    for pid in [proc.pid, *below]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return below


def kill_run(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGKILL the launch and its workers, and wait until none of them runs (a crash of the whole job: no
    worker of it writes to the run directory afterwards)."""
    below = signal_run(proc, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + timeout
    while any(running(pid) for pid in below):
        if time.time() > deadline:
            raise AssertionError(f"processes {below} outlived SIGKILL for {timeout} s")
        time.sleep(0.05)


def losses(run_dir: Path) -> dict:
    """step -> training loss from metrics.jsonl (later lines win: a resumed run re-logs nothing)."""
    out = {}
    path = Path(run_dir) / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def records(run_dir: Path) -> list:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@dataclass
class Outcome:
    """One run of run_scenarios: rank 0's output, and the exception the run raised, if any."""

    stdout: str
    stderr: str
    error: Optional[str]  # exception type name
    message: str
    summary: Optional[dict]  # retnet_train.train.run's return value


def run_scenarios(scenarios: list, nproc: int, workdir: Path, timeout: int = 600, script: str = "") -> dict:
    """Several trainer runs in ONE launch (torchrun for nproc > 1), one after another in the same
    processes (run_scenarios.py): torch's, DeepSpeed's and torchrun's start-up (~9 s for one rank,
    ~13 s for two on a 2-core CI box) is paid once instead of once per run. Each run is composed
    from its overrides as the CLI composes them and goes through retnet_train.train.run, which the
    CLI calls. scenarios: [(name, args)] or [(name, args, expected exception type name)]; returns
    {name: Outcome}. A run that raises what it does not expect fails the launch (AssertionError).
    script: another worker here that calls run_scenarios.main with its own run_one."""
    spec = [
        {
            "name": name,
            "args": args,
            "out": str(workdir / "scenarios" / name),
            "expect_error": expect[0] if expect else None,
        }
        for name, args, *expect in scenarios
    ]
    workdir.mkdir(parents=True, exist_ok=True)
    spec_file = workdir / "scenarios.json"
    spec_file.write_text(json.dumps(spec))
    script = str(Path(__file__).resolve().parent / (script or "run_scenarios.py"))
    cmd = (
        [sys.executable, script, str(spec_file)]
        if nproc == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            script,
            str(spec_file),
        ]
    )
    # the script's own directory comes first on its sys.path: this checkout's package next
    run_env = {**env(), "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(cmd, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        failed = [
            p
            for p in sorted((workdir / "scenarios").glob("*/rank*.stderr"))
            if not p.with_suffix(".json").exists() or "error" in json.loads(p.with_suffix(".json").read_text())
        ]
        logs = "".join(f"\n--- {p}:\n{p.read_text()[-4000:]}" for p in failed)
        raise AssertionError(
            f"scenario launch failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}{logs}"
        )
    out = {}
    for s in spec:
        d = Path(s["out"])
        result = json.loads((d / "rank0.json").read_text())
        out[s["name"]] = Outcome(
            (d / "rank0.stdout").read_text(),
            (d / "rank0.stderr").read_text(),
            result.get("error"),
            result.get("message", ""),
            result.get("summary"),
        )
    return out
