"""retnet_train.plot: curves of several runs from their metrics.jsonl, x in tokens."""

import json

import pytest

from retnet_train.plot import MetricsError, main, plot_curves, read_metrics

TOKENS_PER_STEP = 4096


def logged(first, last, log_every, eval_every, loss0):
    """The records the trainer writes for steps first..last: training records with tokens_seen,
    evaluation records with step and val_loss only."""
    lines = []
    for step in range(first, last + 1):
        if step % log_every == 0:
            lines.append(
                {
                    "step": step,
                    "loss": loss0 / step**0.3,
                    "tokens_per_s": 1000.0 * step,
                    "tokens_seen": step * TOKENS_PER_STEP,
                    "lr": 1e-3,
                }
            )
        if step % eval_every == 0:
            lines.append({"step": step, "val_loss": loss0 / step**0.3 + 0.1, "val_ppl": 1.0})
    return lines


def write_run(path, steps=40, log_every=10, eval_every=15, loss0=8.0, resumed_at=None):
    """metrics.jsonl of a run; resumed_at: the run was resumed after a crash and logged the steps from
    resumed_at to the end again (its first record different from the first attempt's)."""
    path.mkdir(parents=True)
    lines = logged(1, steps, log_every, eval_every, loss0)
    if resumed_at is not None:
        again = logged(resumed_at, steps, log_every, eval_every, loss0)
        again[0] |= {"loss": 1.0, "tokens_per_s": 5.0}
        lines += again
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return path


def test_read_metrics_puts_evaluations_on_the_token_axis(tmp_path):
    run = read_metrics(write_run(tmp_path / "retnet", resumed_at=20))
    assert run.name == "retnet"
    assert run.tokens == [10 * 4096, 20 * 4096, 30 * 4096, 40 * 4096]
    assert run.loss[1] == 1.0 and run.tokens_per_s[1] == 5.0  # the last record of step 20 wins
    assert run.val_tokens == [15 * 4096, 30 * 4096]  # step 15 between two training records
    assert run.final_val_loss == pytest.approx(8.0 / 30**0.3 + 0.1)
    assert run.mean_tokens_per_s() == pytest.approx((5.0 + 30000 + 40000) / 3)


def test_plot_writes_a_png_with_one_line_per_run(tmp_path):
    import matplotlib.image

    runs = [read_metrics(write_run(tmp_path / name, loss0=l0), name) for name, l0 in [("a", 8.0), ("b", 7.0)]]
    out = plot_curves(runs, tmp_path / "out" / "curves.png", title="test")
    image = matplotlib.image.imread(out)
    assert image.shape[0] > 400 and image.shape[1] > 1500
    assert image[..., :3].std() > 0.05  # drawn on, not blank


def test_cli_writes_the_plot_and_names_each_run(tmp_path, capsys):
    a, b = write_run(tmp_path / "a"), write_run(tmp_path / "b")
    main([str(a), str(b), "--out", str(tmp_path / "c.png"), "--labels", "RetNet,Transformer"])
    assert (tmp_path / "c.png").stat().st_size > 10_000
    assert "c.png" in capsys.readouterr().out


@pytest.mark.parametrize(
    "content,needle",
    [
        (None, "no such file"),
        ("", "empty"),
        ('{"step": 1, "loss": 2.0}\nstep 2 | loss 1.9\n', ":2: not a JSON line"),
        ('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}}\n', ":2: not a JSON line"),
        ('{"step": 1, "val_loss": 2.0}\n', "no training records"),
        ('{"loss": 2.0}\n', ":1: a record needs an integer 'step'"),
    ],
)
def test_bad_metrics_fail_naming_the_file(tmp_path, capsys, content, needle):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    with pytest.raises(MetricsError, match=needle):
        read_metrics(run)
    with pytest.raises(SystemExit) as exit_info:
        main([str(run), "--out", str(tmp_path / "x.png")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert str(run / "metrics.jsonl") in err and needle in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_labels_must_match_the_runs(tmp_path):
    with pytest.raises(SystemExit):
        main([str(write_run(tmp_path / "a")), "--out", str(tmp_path / "x.png"), "--labels", "a,b"])


CUT_SHORT = '{"step": 50, "loss": 2.5, "tokens_per_s"'  # what a run killed while writing a record leaves


def test_a_record_cut_short_by_a_killed_run_is_left_out_with_a_warning(tmp_path, capsys):
    """The run's other records are plotted (the whole file was refused); the cut line is named."""
    run = write_run(tmp_path / "killed")
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + CUT_SHORT)
    assert read_metrics(run).tokens == [10 * 4096, 20 * 4096, 30 * 4096, 40 * 4096]
    main([str(run), "--out", str(tmp_path / "c.png")])
    assert (tmp_path / "c.png").stat().st_size > 10_000
    assert capsys.readouterr().err == f"warning: {metrics}:7: a record cut short (a killed run); left out\n"


def test_a_run_resumed_after_a_cut_record_is_plotted_to_its_end(tmp_path, capsys):
    run = write_run(tmp_path / "resumed")
    metrics = run / "metrics.jsonl"
    again = {"step": 50, "loss": 2.0, "tokens_per_s": 9.0, "tokens_seen": 50 * TOKENS_PER_STEP}
    metrics.write_text(metrics.read_text() + CUT_SHORT + "\n" + json.dumps(again) + "\n")
    curves = read_metrics(run)
    assert curves.tokens[-1] == 50 * TOKENS_PER_STEP and curves.loss[-1] == 2.0
    assert curves.cut_lines == [7]


@pytest.mark.parametrize(
    "name, needle",
    [
        ("curves", "curves: no file extension (.png, .pdf, .svg, ...)"),
        ("curves.txt", "curves.txt: .txt is not an image format matplotlib writes"),
        ("a/metrics.jsonl", "metrics.jsonl: .jsonl is not an image format"),
    ],
)
def test_an_out_path_that_is_no_image_file_is_refused_and_nothing_written(tmp_path, capsys, name, needle):
    """matplotlib wrote curves.png for --out curves (and the CLI said 'wrote curves'), and refused .txt
    in a traceback after reading the runs."""
    run = write_run(tmp_path / "a")
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit) as exit_info:
        main([str(run), "--out", str(tmp_path / name)])
    assert exit_info.value.code == 2
    assert needle in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    assert (run / "metrics.jsonl").read_text() == before


def test_out_may_name_a_pdf_in_a_directory_made_for_it(tmp_path, capsys):
    out = tmp_path / "new" / "curves.pdf"
    main([str(write_run(tmp_path / "a")), "--out", str(out)])
    assert out.read_bytes()[:4] == b"%PDF"
    assert capsys.readouterr().out == f"wrote {out}\n"


def test_a_resumed_run_still_short_of_where_the_first_attempt_died_shows_its_own_records(tmp_path):
    """The first attempt (checkpoint at 20) logged to step 40 and evaluated at 40; the resumed run has
    logged step 30 so far. Steps 40's loss and validation loss were the dead attempt's, drawn as the run's."""
    run = tmp_path / "resumed"
    run.mkdir()
    records = [{"step": s, "loss": 9.0 - s / 10, "tokens_per_s": 1.0, "tokens_seen": s * 100} for s in (10, 20, 30, 40)]
    records[2:2] = [{"step": 20, "val_loss": 7.0}]
    records += [{"step": 40, "val_loss": 5.0}]
    records += [{"step": 30, "loss": 6.5, "tokens_per_s": 2.0, "tokens_seen": 3000}]  # the resumed run
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    curves = read_metrics(run)
    assert (curves.tokens, curves.loss) == ([1000, 2000, 3000], [8.0, 7.0, 6.5])
    assert (curves.val_tokens, curves.val_loss) == ([2000], [7.0])


def test_each_panel_names_what_its_axes_measure(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plot_curves([read_metrics(write_run(tmp_path / "a", loss0=8.0), "a")], tmp_path / "curves.png")
    axes = figures[0].axes
    assert [ax.get_xlabel() for ax in axes] == ["tokens"] * 3
    assert [ax.get_ylabel() for ax in axes] == ["nats per token", "nats per token", "tokens per second"]
    monkeypatch.undo()
    plt.close(figures[0])
