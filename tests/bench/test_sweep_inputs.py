"""bench.sweep and bench.tradeoff on what users hand them: a rows file that also holds another
benchmark's lines, and the image path of --plot."""

import json

import pytest

from retnet_train.bench import sweep, tradeoff
from retnet_train.bench.train_throughput import parse_args


def train_row(model, seq_len, micro_batch, grad_accum, **fields):
    row = {"model": model, "overrides": {}, "preset": "1.3b", "zero_stage": 1, "compile": True}
    row |= {"activation_memory_budget": 0.8, "activation_checkpointing": "none", "device": "NVIDIA H100"}
    row |= {"seq_len": seq_len, "micro_batch": micro_batch, "grad_accum": grad_accum}
    return row | {"tokens_per_s": 1000.0, "peak_gib": 10.0, "sweep_tokens_per_step": 65536} | fields


# what bench.retention_kernels and bench.context_parallel print: JSON lines without a model
KERNEL_ROW = {"dims": "256x512", "backend": "triton@64", "B": 32, "T": 2048, "ms_fwd_bwd": 3.88}
CONTEXT_PARALLEL_ROW = {"preset": "1.3b", "world": 1, "seq_len": 32768, "tokens_per_s": 26732.1, "fits": True}


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_rows_of_another_benchmark_in_the_file_are_left_out_of_the_sweep(tmp_path, monkeypatch):
    rows = [train_row("retnet", 2048, 8, 4), KERNEL_ROW, train_row("transformer", 2048, 8, 4), CONTEXT_PARALLEL_ROW]
    drawn = {}
    monkeypatch.setattr(sweep, "plot_sweep", lambda rows, path, title: drawn.update(rows=rows, title=title))
    sweep.main([write_rows(tmp_path / "rows.jsonl", rows), "--plot", str(tmp_path / "sweep.png")])
    assert [r["model"] for r in drawn["rows"]] == ["retnet", "transformer"]
    assert drawn["title"] == "1.3b on NVIDIA H100: 65,536 tokens per step, ZeRO-1, compiled, budget 0.8"


def test_rows_of_another_benchmark_at_the_length_are_left_out_of_the_tradeoff(tmp_path, monkeypatch):
    rows = [train_row("retnet", 32768, 1, 2), CONTEXT_PARALLEL_ROW, train_row("retnet", 32768, 1, 2, peak_gib=9.0)]
    drawn = {}
    monkeypatch.setattr(tradeoff, "plot_tradeoff", lambda rows, path: drawn.update(rows=rows))
    path = write_rows(tmp_path / "rows.jsonl", rows)
    tradeoff.main([path, "--seq-len", "32768", "--plot", str(tmp_path / "t.png")])
    assert [r["peak_gib"] for r in drawn["rows"]] == [10.0, 9.0]


@pytest.mark.parametrize(
    "name, needle",
    [
        ("sweep", "sweep: no file extension (.png, .pdf, .svg, ...)"),
        ("sweep.txt", "sweep.txt: .txt is not an image format matplotlib writes (.png, .pdf, .svg, ...)"),
        ("rows.jsonl", "rows.jsonl: .jsonl is not an image format"),
    ],
)
def test_a_plot_path_that_is_no_image_file_is_refused_before_anything_is_read_or_written(
    tmp_path, capsys, name, needle
):
    """matplotlib adds .png to a name without an extension (and the CLIs reported the name given) and
    refuses any other extension in a traceback once the figure is drawn; train_throughput found out only
    after measuring every model."""
    rows_file = write_rows(tmp_path / "rows.jsonl", [train_row("retnet", 32768, 1, 2)])
    before = (tmp_path / "rows.jsonl").read_text()
    target = str(tmp_path / name)
    for run in (
        lambda: sweep.main([rows_file, "--plot", target]),
        lambda: tradeoff.main([rows_file, "--seq-len", "32768", "--plot", target]),
        lambda: parse_args(["--plot", target]),
    ):
        with pytest.raises(SystemExit) as exit_info:
            run()
        assert exit_info.value.code == 2
        assert needle in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]
    assert (tmp_path / "rows.jsonl").read_text() == before


def test_the_plot_goes_into_a_directory_made_for_it(tmp_path, capsys):
    rows_file = write_rows(tmp_path / "rows.jsonl", [train_row("retnet", 2048, 8, 4), train_row("retnet", 8192, 2, 4)])
    for run, png in (
        (lambda png: sweep.main([rows_file, "--plot", png]), tmp_path / "new" / "sweep.png"),
        (lambda png: tradeoff.main([rows_file, "--seq-len", "8192", "--plot", png]), tmp_path / "new" / "t.pdf"),
    ):
        run(str(png))
        assert png.read_bytes()[:4] in (b"\x89PNG", b"%PDF")
        assert capsys.readouterr().err == f"wrote {png}\n"
