"""The context-parallel memory probe runs on CPU under torchrun (2 gloo ranks) and prints its JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "train"))
from trainer_helpers import REPO, env  # noqa: E402


@pytest.mark.slow
def test_probe_on_two_cpu_ranks():
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "retnet_train.bench.context_parallel",
        "--preset",
        "tiny",
        "--set",
        "n_layers=2",
        "--seq-lens",
        "256,128",
        "--context-parallel",
        "2",
        "--zero-stage",
        "1",
        "--activation-checkpointing",
        "full",
        "--steps",
        "1",
        "--doc-len",
        "50",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["seq_len"] for r in lines[:-1]] == [128, 256]
    assert all(r["fits"] and r["tokens_per_s"] > 0 and len(r["peak_gib_per_rank"]) == 2 for r in lines[:-1])
    assert lines[0]["tokens_per_rank"] == 64
    assert lines[-1]["longest_fitting_seq_len"] == 256
