"""The throughput bench's sequence-length sweep: the batch rule, and a CPU run of the tiny preset at two
lengths that prints a JSON line per model and length and writes the plot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from retnet_train.bench.sweep import batch_for_length, plot_sweep
from retnet_train.bench.throughput_args import model_specs
from retnet_train.bench.train_throughput import parse_args

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "train"))
from trainer_helpers import REPO, env  # noqa: E402


def test_tokens_per_micro_batch_and_step_follow_the_first_length():
    assert batch_for_length(8192, 8192, 2, 4) == (2, 4)  # the first length as given
    assert batch_for_length(2048, 8192, 2, 4) == (8, 4)  # 16k tokens per micro-batch, 64k per step
    assert batch_for_length(32768, 8192, 2, 4) == (1, 2)  # one sequence; the step keeps 64k tokens
    assert batch_for_length(65536, 8192, 2, 4) == (1, 1)
    assert batch_for_length(131072, 8192, 2, 4) == (1, 1)  # at least one sequence, one micro-batch


def test_plot_marks_out_of_memory_lengths(tmp_path):
    rows = [
        {
            "model": "retnet",
            "overrides": {"chunk_size": 256},
            "seq_len": n,
            "tokens_per_s": 10.0 * n,
            "peak_gib": n / 1024,
            "base_grad_accum": 1,
            "device": "cpu",
        }
        for n in (1024, 2048)
    ]
    rows.append(
        {"model": "transformer", "overrides": {}, "seq_len": 2048, "oom": "CUDA out of memory", "base_grad_accum": 1}
    )
    rows.append({"model": "fla", "skipped": "flash-linear-attention is not installed"})
    path = tmp_path / "p.png"
    plot_sweep(rows, str(path), "title")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_cpu_sweep_of_two_lengths_writes_json_lines_and_the_plot(tmp_path):
    plot = tmp_path / "sweep.png"
    cmd = [
        sys.executable,
        "-m",
        "retnet_train.bench.train_throughput",
        "--cpu",
        "--preset",
        "tiny",
        "--models",
        "retnet@n_layers=1,transformer@n_layers=1",
        "--seq-len",
        "64,128",
        "--micro-batch",
        "2",
        "--grad-accum",
        "2",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--zero-stage",
        "1",
        "--plot",
        str(plot),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(r["model"], r["seq_len"], r["micro_batch"], r["grad_accum"]) for r in rows] == [
        ("retnet", 64, 2, 2),
        ("retnet", 128, 1, 2),
        ("transformer", 64, 2, 2),
        ("transformer", 128, 1, 2),
    ]
    assert all(r["tokens_per_s"] > 0 and r["loss"] > 0 and r["device"] == "cpu" for r in rows)
    assert all(r["gpu_power"] is None and r["peak_reserved_gib"] is None for r in rows)  # GPU-only fields
    assert rows[0]["overrides"] == {"n_layers": 1}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--grad-accum", "x"], "argument --grad-accum: not a comma list of integers: 'x'"),
        (["--grad-accum", "4,0"], "argument --grad-accum: needs integers >= 1: '4,0'"),
        (["--micro-batch", "0"], "argument --micro-batch: needs an integer >= 1: '0'"),
        (["--steps", "0"], "argument --steps: needs an integer >= 1: '0'"),
        (["--warmup", "-1"], "argument --warmup: needs an integer >= 0: '-1'"),
        (["--profile-trace", "traces"], "--profile-trace needs --profile"),
    ],
)
def test_bad_arguments_are_named_before_any_model_is_built(capsys, args, needle):
    """Each of these ran a model and then died in a traceback (--steps 0, --grad-accum x), or ran
    something other than asked (--grad-accum 0 and --micro-batch 0 ran 1; --profile-trace alone
    recorded nothing)."""
    with pytest.raises(SystemExit) as e:
        parse_args(args)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_grad_accum_list_and_warmup_zero_parse():
    args = parse_args(["--grad-accum", "1,4", "--warmup", "0"])
    assert args.grad_accum == [1, 4] and args.warmup == 0
    assert parse_args([]).grad_accum == [1]


def test_a_model_override_without_a_value_is_named():
    with pytest.raises(SystemExit, match="--models: 'chunk_size' in 'retnet@chunk_size' is not KEY=VALUE"):
        model_specs("retnet@chunk_size", "tiny", "torch")
