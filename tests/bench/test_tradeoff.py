"""bench.tradeoff: tokens/s against peak memory across activation memory budgets, from the JSON lines of
bench.train_throughput runs."""

import json

import pytest

from retnet_train.bench.tradeoff import main, measured_at, point_labels, tradeoff_lines

SHARED = {
    "preset": "1.3b",
    "device": "NVIDIA H100",
    "zero_stage": 1,
    "compile": True,
    "micro_batch": 1,
    "grad_accum": 2,
}


def row(model, budget, peak, speed, seq_len=32768, mode="none", **extra):
    return {
        **SHARED,
        "model": model,
        "seq_len": seq_len,
        "activation_memory_budget": budget,
        "activation_checkpointing": mode,
        "peak_gib": peak,
        "tokens_per_s": speed,
        "overrides": {"chunk_size": 256} if model == "retnet" else {},
        **extra,
    }


ROWS = [
    row("retnet", 0.6, 47.01, 51088.0, mode="selective"),
    row("retnet", 0.5, 44.14, 50341.0, mode="selective"),
    row("retnet", 0.5, 47.02, 51452.0),
    row("transformer", 0.6, 55.29, 24491.0, mode="selective"),  # no retention core: a run without recompute
    row("transformer", 0.5, 52.27, 24537.0),
]


def test_lines_per_model_and_checkpointing_by_budget():
    assert tradeoff_lines(ROWS) == {
        ("retnet@chunk_size=256", "selective"): [(0.5, 44.14, 50341.0), (0.6, 47.01, 51088.0)],
        ("retnet@chunk_size=256", "none"): [(0.5, 47.02, 51452.0)],
        ("transformer", "none"): [(0.5, 52.27, 24537.0), (0.6, 55.29, 24491.0)],
    }


def test_budgets_at_one_peak_share_a_label():
    points = [(0.5, 52.27, 24537.0), (0.55, 55.35, 24557.0), (0.6, 55.29, 24491.0), (0.8, 58.33, 28058.0)]
    assert point_labels(points) == {
        (52.27, 24537.0): "0.5",
        (55.35, 24557.0): "0.55, 0.6",
        (58.33, 28058.0): "0.8",
    }


def test_rows_of_one_length_are_picked_and_other_settings_refused():
    other = [row("retnet", 0.5, 32.83, 50286.0, seq_len=8192), {"model": "fla", "skipped": "no fla"}]
    oom = {**SHARED, "model": "transformer", "seq_len": 32768, "oom": "CUDA out of memory"}
    assert measured_at({"a.jsonl": ROWS, "b.jsonl": [*other, oom]}, 32768) == ROWS
    with pytest.raises(SystemExit, match=r"^no measured rows at sequence length 2048 in a.jsonl, b.jsonl$"):
        measured_at({"a.jsonl": ROWS, "b.jsonl": other}, 2048)
    h200 = [row("transformer", 0.5, 52.34, 24708.0, device="NVIDIA H200")]
    with pytest.raises(
        SystemExit, match=r"^device differs: NVIDIA H100 in a.jsonl, NVIDIA H200 in b.jsonl: not one plot$"
    ):
        measured_at({"a.jsonl": ROWS, "b.jsonl": h200}, 32768)
    longer_step = [row("transformer", 0.5, 52.27, 24537.0, grad_accum=4)]
    with pytest.raises(SystemExit, match=r"^grad_accum differs: 2 in a.jsonl, 4 in b.jsonl"):
        measured_at({"a.jsonl": ROWS, "b.jsonl": longer_step}, 32768)


def test_cli_draws_the_png_of_several_runs(tmp_path, capsys):
    a, b, png = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "tradeoff.png"
    a.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:3]))
    b.write_text("a warning line\n" + "".join(json.dumps(r) + "\n" for r in ROWS[3:]))
    main([str(a), str(b), "--seq-len", "32768", "--plot", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert capsys.readouterr().err == f"wrote {png}\n"
