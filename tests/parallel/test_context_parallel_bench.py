"""The context-parallel memory probe runs on CPU under torchrun (2 gloo ranks) and prints its JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "train"))
from trainer_helpers import REPO, env  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", ["1", "3"])
def test_probe_on_two_cpu_ranks(zero_stage):
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
        zero_stage,
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
    assert lines[0]["params"] == tiny_params(n_layers=2)  # the whole model's, also where ZeRO-3 shards it


def tiny_params(**change) -> int:
    import yaml

    from retnet_train.model import build_model, model_config_from_dict

    cfg = yaml.safe_load((REPO / "configs" / "model" / "tiny.yaml").read_text())
    return sum(p.numel() for p in build_model(model_config_from_dict({**cfg, **change})).parameters())
