"""bench.quality on CPU: the tiny presets and the Hugging Face Llama loop for 2 steps each; rows,
table and plot written; models added in a later invocation keep the earlier rows."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "data"))
from shard_fixtures import learnable_tokens, write_shard_dir  # noqa: E402

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
VOCAB = 8192  # the tiny presets'
CPU_ARGS = [
    "--size",
    "tiny",
    "--tokens",
    "1024",
    "--seq-len",
    "64",
    "--batch-tokens",
    "512",
    "--micro-batch",
    "4",
    "--device",
    "cpu",
    "--precision",
    "fp32",
    "--zero-stage",
    "0",
    "--no-compile",
    "--warmup-steps",
    "1",
    "--log-interval",
    "1",
    "--eval-interval",
    "1",
    "--eval-batches",
    "2",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    toks = learnable_tokens(20_000, 510)  # ids 10..509 and EOS, under VOCAB
    directory = tmp_path_factory.mktemp("shards") / "syn"
    write_shard_dir(directory, toks[:16_000], toks[16_000:], shard_tokens=4096, vocab_size=VOCAB)
    return directory


def bench(*args, check=True):
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")},
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "retnet_train.bench.quality", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def result(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    proc = bench("--data", str(shards), "--out", str(out), *CPU_ARGS)
    return out, proc


def rows(out):
    return [json.loads(line) for line in (out / "quality.jsonl").read_text().splitlines()]


def test_every_model_trains_the_same_tokens_and_gets_a_row(result):
    out, proc = result
    table = rows(out)
    assert [r["model"] for r in table] == ["retnet", "transformer", "transformer_pp", "llama"]
    for r in table:
        assert (r["steps"], r["tokens"]) == (2, 1024)
        assert 0 < r["val_loss"] < 10 and r["val_ppl"] == pytest.approx(np.exp(r["val_loss"]))
        assert r["tokens_per_s"] > 0
        metrics = [json.loads(line) for line in (out / r["run_dir"] / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics if "loss" in m] == [1, 2]
        assert [m["step"] for m in metrics if "val_loss" in m] == [1, 2]
    by = {r["model"]: r for r in table}
    assert by["llama"]["params"] == by["transformer_pp"]["params"]  # the same network, two implementations
    assert by["llama"]["loop"] == "plain torch" and by["retnet"]["loop"] == "retnet_train.train"
    printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [p["model"] for p in printed] == [r["model"] for r in table]


def test_table_and_plot_are_written(result):
    out, proc = result
    md = (out / "quality.md").read_text().splitlines()
    assert md[0].startswith("| model |") and len(md) == 2 + 4
    assert "`transformer_pp`" in md[4] and "| 1,024 |" in md[4] and "| 3.0M |" in md[4]
    assert (out / "curves.png").stat().st_size > 20_000
    assert "quality.md" in proc.stdout


def test_a_later_invocation_adds_rows_and_refuses_to_retrain_silently(result, shards):
    out, _ = result
    before = {r["model"]: r for r in rows(out)}
    proc = bench("--data", str(shards), "--out", str(out), "--models", "retnet:document_masking=false", *CPU_ARGS)
    table = rows(out)
    assert [r["model"] for r in table] == [
        "retnet",
        "retnet:document_masking=false",
        "transformer",
        "transformer_pp",
        "llama",
    ]
    assert {r["model"]: r for r in table}["llama"] == before["llama"]
    assert "model.document_masking=false" in table[1]["overrides"]
    proc = bench("--data", str(shards), "--out", str(out), "--models", "retnet", *CPU_ARGS, check=False)
    assert proc.returncode == 1 and "runs/retnet: exists" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--models", "mamba"], "'mamba' is not one of"),
        (["--models", "retnet:chunk_size"], "is not KEY=VALUE"),
        (["--models", "retnet", "retnet"], "names a model twice"),
        (["--models", "retnet:n_layer=2"], "model.n_layer"),
        (["--tokens", "100"], "less than one step"),
        (["--data", "/nonexistent/shards"], "--data /nonexistent/shards: no such directory"),
        (
            ["--precision", "bf16", "--zero-stage", "2", "--grad-accum-dtype", "fp32"],
            "deepspeed.grad_accum_dtype=fp32 needs deepspeed.precision",
        ),
    ],
)
def test_bad_arguments_fail_in_one_line_before_training(tmp_path, shards, capsys, args, needle):
    from retnet_train.bench.quality import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--data", str(shards), "--out", str(tmp_path / "o"), *CPU_ARGS, *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "runs").exists()


def test_default_settings_are_the_documented_recipe(tmp_path):
    """seq 2048, 262,144 tokens per step, AdamW lr 1e-3, 40 warm-up steps, cosine to 0.1, ZeRO-1 bf16 with
    DeepSpeed's gradient accumulation (the trainer's default), compiled."""
    from retnet_train.bench.quality import compose, parse_args, parse_model, trainer_overrides
    from retnet_train.components.config import grad_accumulation

    s, _ = parse_args(["--data", str(tmp_path), "--out", str(tmp_path / "o")])
    cfg = compose(trainer_overrides(s, parse_model("transformer_pp"), tmp_path / "run"))
    assert (cfg.data.seq_len, cfg.train.global_batch_tokens, cfg.train.max_steps) == (2048, 262_144, 190)
    assert grad_accumulation(cfg, 1) * cfg.train.micro_batch_size * cfg.data.seq_len == 262_144
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.decay, cfg.optim.min_lr_ratio) == (1e-3, 40, "cosine", 0.1)
    assert (cfg.deepspeed.zero_stage, cfg.deepspeed.precision, cfg.train.compile) == (1, "bf16", True)
    assert cfg.deepspeed.grad_accum_dtype is None  # the trainer's default
    assert cfg.model["arch"] == "transformer" and cfg.model["norm"] == "rmsnorm" and cfg.model["d_model"] == 768


def test_grad_accum_dtype_fp32_reaches_the_trainer(tmp_path):
    from retnet_train.bench.quality import compose, parse_args, parse_model, trainer_overrides

    s, _ = parse_args(["--data", str(tmp_path), "--out", str(tmp_path / "o"), "--grad-accum-dtype", "fp32"])
    overrides = trainer_overrides(s, parse_model("transformer_pp"), tmp_path / "run")
    assert "deepspeed.grad_accum_dtype=fp32" in overrides
    assert compose(overrides).deepspeed.grad_accum_dtype == "fp32"


def test_an_earlier_run_in_the_way_is_refused_before_any_model_trains(tmp_path, shards, capsys):
    """--models retnet transformer with runs/transformer left by an earlier call: refused before
    retnet trains (it used to train retnet first, then stop at transformer)."""
    from retnet_train.bench.quality import main

    out = tmp_path / "o"
    (out / "runs" / "transformer").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", str(shards), "--out", str(out), *CPU_ARGS, "--models", "retnet", "transformer"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "runs/transformer: exists" in err and "--overwrite" in err
    assert not (out / "runs" / "retnet").exists() and not (out / "quality.jsonl").exists()


def test_rows_merge_in_model_order_keeping_a_model_this_version_does_not_know():
    from retnet_train.bench.quality_report import merge_rows

    old = [{"model": "gone", "v": 0}, {"model": "transformer", "v": 1}, {"model": "retnet", "v": 2}]
    new = [{"model": "transformer", "v": 3}, {"model": "retnet:chunk_size=128", "v": 4}]
    got = merge_rows(old, new, ["retnet", "transformer"])
    assert [(r["model"], r["v"]) for r in got] == [
        ("retnet", 2),
        ("retnet:chunk_size=128", 4),
        ("transformer", 3),
        ("gone", 0),
    ]
