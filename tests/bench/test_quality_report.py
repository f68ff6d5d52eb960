"""bench.quality's outputs from its rows: the table and the curves of every row whose run is there."""

import json

from retnet_train.bench.quality_report import write_outputs


def write_metrics(run_dir, steps=(10, 20)):
    run_dir.mkdir(parents=True)
    records = [{"step": s, "loss": 8.0 / s, "tokens_per_s": 1e3, "tokens_seen": s * 512} for s in steps]
    records.append({"step": steps[-1], "val_loss": 4.0, "val_ppl": 54.6})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def row(model):
    return {
        "model": model,
        "description": f"{model} model",
        "loop": "retnet_train.train",
        "params": 1000,
        "tokens": 10240,
        "val_loss": 4.0,
        "val_ppl": 54.6,
        "tokens_per_s": 1000.0,
        "peak_mem_gib": 0.5,
        "seq_len": 64,
        "batch_tokens": 512,
        "run_dir": f"runs/{model}",
    }


def test_a_kept_row_whose_run_is_gone_is_left_out_of_the_curves_with_a_warning(tmp_path, capsys):
    """An earlier invocation's row whose run directory was removed stopped every later invocation at the
    plot, after its models had trained ('error: .../metrics.jsonl: no such file'); the plot was not drawn."""
    write_metrics(tmp_path / "runs" / "retnet")
    write_outputs(tmp_path, [row("retnet"), row("transformer")])
    assert [json.loads(line)["model"] for line in (tmp_path / "quality.jsonl").read_text().splitlines()] == [
        "retnet",
        "transformer",
    ]
    assert len((tmp_path / "quality.md").read_text().splitlines()) == 2 + 2
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    missing = tmp_path / "runs" / "transformer" / "metrics.jsonl"
    assert capsys.readouterr().err == (
        f"warning: curves.png leaves out transformer: {missing}: no such file "
        "(not a run directory, or the run has not logged a step yet)\n"
    )
