"""The throughput bench's sequence-length sweep: the batch rule, and a CPU run of the tiny preset at two
lengths that prints a JSON line per model and length and writes the plot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from retnet_train.bench import sweep
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
            "micro_batch": 1,
            "grad_accum": 1,
            "sweep_tokens_per_step": 1024,
            "device": "cpu",
        }
        for n in (1024, 2048)
    ]
    rows.append(
        {
            "model": "transformer",
            "overrides": {},
            "seq_len": 2048,
            "oom": "CUDA out of memory",
            "micro_batch": 1,
            "grad_accum": 1,
        }
    )
    rows.append({"model": "fla", "skipped": "flash-linear-attention is not installed"})
    path = tmp_path / "p.png"
    plot_sweep(rows, str(path), "title")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _row(model, seq_len, micro_batch, grad_accum, **fields):
    base = {"model": model, "overrides": {}, "preset": "1.3b", "zero_stage": 1, "compile": True}
    base |= {"activation_memory_budget": 0.8, "device": "NVIDIA H200"}
    base |= {"seq_len": seq_len, "micro_batch": micro_batch, "grad_accum": grad_accum}
    return base | {"tokens_per_s": 1000.0, "peak_gib": 10.0} | fields


def test_rows_of_several_runs_plot_as_one_line_per_model_and_tokens_per_step(tmp_path, monkeypatch):
    """A sweep split over runs (2,048 at 8 x 4, 32,768 at 1 x 2: 65,536 tokens per step in both) is one
    line per model; stderr text mixed into a file is skipped; the title says the shared settings."""
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text(
        "\n".join(json.dumps(r) for r in [_row("retnet", 2048, 8, 4), _row("transformer", 2048, 8, 4)])
        + "\n[rank0]: a warning\n"
    )
    second.write_text(json.dumps(_row("retnet", 32768, 1, 2)) + "\n" + json.dumps(_row("transformer", 32768, 1, 2)))
    drawn = {}
    monkeypatch.setattr(sweep, "plot_sweep", lambda rows, path, title: drawn.update(rows=rows, title=title))
    sweep.main([str(first), str(second), "--plot", str(tmp_path / "p.png")])
    assert sorted(sweep.sweep_lines(drawn["rows"])) == [("retnet", 65536), ("transformer", 65536)]
    assert [len(v) for v in sweep.sweep_lines(drawn["rows"]).values()] == [2, 2]
    assert drawn["title"] == "1.3b on NVIDIA H200: 65,536 tokens per step, ZeRO-1, compiled, budget 0.8"


def test_rows_of_other_settings_are_not_drawn_as_one_sweep(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps(_row("retnet", 2048, 8, 4)))
    b.write_text(json.dumps(_row("retnet", 32768, 1, 2, activation_memory_budget=0.5)))
    with pytest.raises(SystemExit, match="activation_memory_budget differs: 0.8 in .*a.jsonl, 0.5 in .*b.jsonl"):
        sweep.main([str(a), str(b), "--plot", str(tmp_path / "p.png")])
    b.write_text("{not json\n")
    with pytest.raises(SystemExit, match="b.jsonl:1: not a JSON result row"):
        sweep.main([str(a), str(b), "--plot", str(tmp_path / "p.png")])
    b.write_text("no rows here\n")
    with pytest.raises(SystemExit, match="b.jsonl: no result rows"):
        sweep.main([str(a), str(b), "--plot", str(tmp_path / "p.png")])
    with pytest.raises(SystemExit, match="missing.jsonl: no such file"):
        sweep.main([str(tmp_path / "missing.jsonl"), "--plot", str(tmp_path / "p.png")])
    b.write_text(json.dumps({"model": "fla", "skipped": "fla-core is not installed"}))  # a skipped model: drawn without
    sweep.main([str(a), str(b), "--plot", str(tmp_path / "p.png")])
    b.write_text(json.dumps({"model": "transformer_pp", "preset": "transformer_pp_125m", "val_loss": 5.39}))
    with pytest.raises(
        SystemExit, match=r"b.jsonl:1: not a train_throughput row \(no seq_len, micro_batch, grad_accum\)"
    ):
        sweep.main([str(a), str(b), "--plot", str(tmp_path / "p.png")])  # bench.quality's rows, refused by name


def test_fla_rows_of_a_compiled_run_are_one_sweep_with_ours(tmp_path, monkeypatch):
    """train_throughput writes fla's rows with compile false and budget 1.0 (fla is never compiled) beside
    our compiled models': one run's rows, and runs of the same settings, plot together."""
    fla = {"compile": False, "activation_memory_budget": 1.0}
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps(_row("retnet", 2048, 8, 4)) + "\n" + json.dumps(_row("fla", 2048, 8, 4, **fla)))
    b.write_text(json.dumps(_row("retnet", 32768, 1, 2)) + "\n" + json.dumps(_row("fla", 32768, 1, 2, **fla)))
    drawn = {}
    monkeypatch.setattr(sweep, "plot_sweep", lambda rows, path, title: drawn.update(rows=rows, title=title))
    sweep.main([str(a), str(b), "--plot", str(tmp_path / "p.png")])
    assert sorted(sweep.sweep_lines(drawn["rows"])) == [("fla", 65536), ("retnet", 65536)]
    b.write_text(json.dumps(_row("retnet", 32768, 1, 2, compile=False)))
    with pytest.raises(SystemExit, match="compile differs"):
        sweep.main([str(a), str(b), "--plot", str(tmp_path / "p.png")])


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
        (["--doc-len", "-1"], "argument --doc-len: needs an integer >= 0: '-1'"),
        (["--profile-trace", "traces"], "--profile-trace needs --profile"),
        (["--compile", "--activation-memory-budget", "0.5,x"], "not a comma list of numbers: '0.5,x'"),
        (["--compile", "--activation-memory-budget", "0.5,1.5"], "needs budgets in (0, 1]: '0.5,1.5'"),
        (["--activation-memory-budget", "1,0.5"], "--activation-memory-budget needs --compile"),
        (["--activation-checkpointing", "none,some"], "'some' is not one of none, selective, full: 'none,some'"),
        (["--compile", "--activation-memory-budget", "0.5,0.6", "--plot", "p.png"], "draw several with"),
        (["--activation-checkpointing", "none,full", "--plot", "p.png"], "bench.tradeoff on the printed rows"),
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
    default = parse_args([])
    assert (default.grad_accum, default.activation_memory_budget, default.activation_checkpointing) == (
        [1],
        [1.0],
        ["none"],
    )


def test_every_budget_and_checkpointing_mode_is_measured_in_one_run(monkeypatch, capsys):
    """--activation-memory-budget 0.5,0.8 --activation-checkpointing none,selective: each model at each
    budget and mode, one printed row each; fla's model (uncompiled: no budget applies) once per mode,
    its selective point skipped."""
    from retnet_train.bench import train_throughput

    measured = []

    def fake_measure(name, build, cfg, args, device):
        measured.append((name, args.activation_memory_budget, args.activation_checkpointing, args.seq_len))
        return {"model": name, "activation_memory_budget": args.activation_memory_budget}

    monkeypatch.setattr(train_throughput, "measure_or_oom", fake_measure)
    monkeypatch.setattr(train_throughput, "fla_skip", lambda mode: "no selective" if mode == "selective" else None)
    args = parse_args(
        ["--compile", "--models", "retnet,fla", "--seq-len", "64", "--activation-memory-budget", "0.5,0.8"]
        + ["--activation-checkpointing", "none,selective"]
    )
    rows = train_throughput.run_sweep(args, device=None)
    assert measured == [
        ("retnet", 0.5, "none", 64),
        ("retnet", 0.5, "selective", 64),
        ("retnet", 0.8, "none", 64),
        ("retnet", 0.8, "selective", 64),
        ("fla", 0.5, "none", 64),
    ]
    assert [r.get("skipped") for r in rows if r["model"] == "fla"] == [None, "no selective"]
    assert len(capsys.readouterr().out.splitlines()) == 6


def test_a_model_override_without_a_value_is_named():
    with pytest.raises(SystemExit, match="--models: 'chunk_size' in 'retnet@chunk_size' is not KEY=VALUE"):
        model_specs("retnet@chunk_size", "tiny", "torch")
