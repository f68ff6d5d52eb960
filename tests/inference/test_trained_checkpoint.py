"""End to end with the real trainer: two ranks under ZeRO-3 train a few steps and save; one
process consolidates the checkpoint, reproduces the trainer's own validation loss with
`evaluate`, generates from it and exports it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gen_fixtures import TEXTS, TINY_TRAINER_MODEL, train_tokenizer, write_shards

from retnet_train.inference.evaluate import main as evaluate_main
from retnet_train.inference.export import main as export_main
from retnet_train.inference.generate import main as generate_main
from retnet_train.inference.load import load_model

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_trainer_checkpoint_to_eval_generate_export(tmp_path, capsys):
    tok = train_tokenizer(tmp_path)
    write_shards(tmp_path / "shards", tok, TEXTS * 40)
    run_dir = tmp_path / "run"
    args = {
        **TINY_TRAINER_MODEL,
        "data.paths": "[%s]" % (tmp_path / "shards"),
        "data.tokenizer": str(tok),
        "data.seq_len": 32,
        "train.micro_batch_size": 2,
        "train.global_batch_tokens": 128,
        "train.max_steps": 3,
        "train.device": "cpu",
        "train.eval_interval": 3,
        "train.eval_batches": 2,
        "deepspeed.precision": "fp32",
        "deepspeed.zero_stage": 3,
        "checkpoint.interval": 3,
        "run.dir": str(run_dir),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "retnet_train.train",
        *[f"{k}={v}" for k, v in args.items()],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    val = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val_loss = [r["val_loss"] for r in val if "val_loss" in r][-1]

    loaded = load_model(str(run_dir))
    assert loaded.meta["tag"] == "step_00000003" and loaded.tokenizer_path == str(tok)
    capsys.readouterr()  # what DeepSpeed logged when load_model imported it (only the commands keep stdout clean)
    # the consolidated weights give the trainer's validation loss (same windows: 2 batches x 2 x 2 ranks)
    assert (
        evaluate_main(
            [
                "--checkpoint",
                str(run_dir),
                "--data",
                str(tmp_path / "shards"),
                "--batch-size",
                "2",
                "--max-sequences",
                "8",
            ]
        )
        == 0
    )
    ours = json.loads(capsys.readouterr().out)
    assert (ours["checkpoint_tag"], ours["checkpoint_step"]) == ("step_00000003", 3)
    ours = ours["validation"]
    assert ours["loss"] == pytest.approx(val_loss, rel=1e-5)
    # without --seq-len: the checkpoint's data.seq_len, and the JSON says what was measured
    assert (ours["seq_len"], ours["batch_size"], ours["max_sequences"]) == (32, 2, 8)
    assert ours["data"] == {"shards": str(tmp_path / "shards")}
    assert (
        generate_main(["--checkpoint", str(run_dir), "--prompt", "one two", "--max-new-tokens", "4", "--greedy"]) == 0
    )
    assert export_main(["--checkpoint", str(run_dir), "--out", str(tmp_path / "exp")]) == 0
    assert load_model(str(tmp_path / "exp")).config.to_dict() == loaded.config.to_dict()
    capsys.readouterr()
    assert evaluate_main(["--checkpoint", str(tmp_path / "exp"), "--data", str(tmp_path / "shards")]) == 0
    assert json.loads(capsys.readouterr().out)["validation"]["seq_len"] == 32  # the export records it
