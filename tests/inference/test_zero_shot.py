"""Zero-shot evaluation end to end on CPU: the trainer trains a tiny RetNet on a small corpus and
saves a checkpoint; `python -m retnet_train.inference.evaluate --tasks` scores that checkpoint with
lm-eval on the multiple-choice task shipped in tests/inference/tasks (local data, no download)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gen_fixtures import TEXTS, VOCAB, train_tokenizer, write_shards

from retnet_train.inference.evaluate import main as evaluate_main

REPO = Path(__file__).resolve().parents[2]
TASKS = REPO / "tests" / "inference" / "tasks"


def train(run_dir: Path, shards: Path, tokenizer: Path, steps: int) -> None:
    args = {
        "model": "tiny",
        "model.vocab_size": VOCAB,
        "model.d_model": 64,
        "model.n_layers": 2,
        "model.n_heads": 2,
        "model.ffn_dim": 128,
        "model.chunk_size": 8,
        "data.paths": f"[{shards}]",
        "data.tokenizer": str(tokenizer),
        "data.seq_len": 32,
        "train.micro_batch_size": 4,
        "train.global_batch_tokens": 128,
        "train.max_steps": steps,
        "train.device": "cpu",
        "train.log_interval": 10,
        "train.eval_interval": steps,
        "train.eval_batches": 2,
        "optim.lr": 3e-3,
        "optim.warmup_steps": 5,
        "optim.decay": "cosine",
        "deepspeed.precision": "fp32",
        "deepspeed.zero_stage": 0,
        "checkpoint.interval": steps,
        "run.dir": str(run_dir),
    }
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")},
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "retnet_train.train", *[f"{k}={v}" for k, v in args.items()]],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def zero_shot(checkpoint: Path, capsys) -> dict:
    assert (
        evaluate_main(
            [
                "--checkpoint",
                str(checkpoint),
                "--tasks",
                "retnet_tiny_continuation",
                "--include-path",
                str(TASKS),
                "--batch-size",
                "4",
                "--max-length",
                "32",
            ]
        )
        == 0
    )
    return json.loads(capsys.readouterr().out.splitlines()[-1])["lm_eval"]["retnet_tiny_continuation"]


def test_a_model_trained_here_passes_the_shipped_zero_shot_task(tmp_path, capsys, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.chdir(REPO)  # the task's data_files are relative to the repository root
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    tok = train_tokenizer(tmp_path)
    write_shards(tmp_path / "shards", tok, TEXTS * 40)
    train(tmp_path / "trained", tmp_path / "shards", tok, steps=60)
    train(tmp_path / "untrained", tmp_path / "shards", tok, steps=1)  # the same model after one step
    trained, untrained = zero_shot(tmp_path / "trained", capsys), zero_shot(tmp_path / "untrained", capsys)
    items = len((TASKS / "retnet_tiny_continuation.jsonl").read_text().splitlines())
    # every item is a phrase of the training texts: the trained model continues each correctly
    assert trained["acc,none"] == 1.0, trained
    assert untrained["acc,none"] <= 1 - 2 / items, untrained
