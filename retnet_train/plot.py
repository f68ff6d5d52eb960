"""Loss, validation loss and tokens/s of several runs against tokens seen, from their metrics.jsonl.

    python -m retnet_train.plot runs/retnet runs/transformer --out curves.png [--labels RetNet,Transformer]

W&B is the online view; this serves offline runs and the docs. A run directory is what the trainer
writes (`run.dir`): its metrics.jsonl has a record per log step (step, loss, tokens_per_s,
tokens_seen, ...) and one per evaluation (step, val_loss). Evaluation records without tokens_seen
get it from the training records' step -> tokens_seen.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

METRICS_FILE = "metrics.jsonl"


class MetricsError(ValueError):
    """A run directory without usable metrics; the message names the file."""


@dataclass
class RunCurves:
    name: str
    tokens: list[float] = field(default_factory=list)  # per training log step
    loss: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    val_tokens: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    peak_mem_gib: float | None = None  # the largest logged
    cut_lines: list[int] = field(default_factory=list)  # records cut short by a killed run, left out

    @property
    def final_val_loss(self) -> float | None:
        return self.val_loss[-1] if self.val_loss else None

    def mean_tokens_per_s(self, skip_first: int = 1) -> float | None:
        """Mean of the logged rates, the first `skip_first` left out (they hold compilation and warm-up)."""
        rates = [r for r in self.tokens_per_s[skip_first:] if r is not None] or [
            r for r in self.tokens_per_s if r is not None
        ]
        return sum(rates) / len(rates) if rates else None


def _cut_short(line: str) -> bool:
    """A record whose writer was killed partway: an opened object never closed (any other line that is not
    JSON is damage of another kind)."""
    line = line.strip()
    return line.startswith("{") and not line.endswith("}")


def _records(path: Path) -> tuple[list[dict], list[int]]:
    """The file's records, and the numbers of the lines cut short (left out)."""
    if not path.is_file():
        raise MetricsError(f"{path}: no such file (not a run directory, or the run has not logged a step yet)")
    records, cut = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if _cut_short(line):
                    cut.append(n)
                    continue
                raise MetricsError(f"{path}:{n}: not a JSON line") from None
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise MetricsError(f"{path}:{n}: a record needs an integer 'step'")
            records.append(record)
    if not records:
        raise MetricsError(f"{path}: empty (the run has not logged a step yet)")
    return records, cut


def _latest_attempt(records: list[dict]) -> list[dict]:
    """The records of the run as it went on: a training record at a step the file has reached already
    starts a resumed attempt, which supersedes every record of an earlier one from that step on (also
    those of steps the resumed run has not logged yet: they belong to an attempt that died)."""
    kept, last_train_step = [], None
    for r in records:
        if "tokens_seen" in r:
            if last_train_step is not None and r["step"] <= last_train_step:
                kept = [k for k in kept if k["step"] < r["step"]]
            last_train_step = r["step"]
        kept.append(r)
    return kept


def _last_per_step(records: list[dict], key: str) -> list[dict]:
    """Records holding `key`, one per step (the last: a resumed run logs its steps again), by step."""
    by_step = {r["step"]: r for r in records if r.get(key) is not None}
    return [by_step[s] for s in sorted(by_step)]


def _interpolate(x: float, xs: list[float], ys: list[float]) -> float:
    """Piecewise-linear y(x) through (0, 0) and the points; extrapolated with the last slope."""
    xs, ys = [0.0] + xs, [0.0] + ys
    for i in range(1, len(xs)):
        if x <= xs[i] or i == len(xs) - 1:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 != x0 else y1
    return ys[-1]


def read_metrics(run_dir: str | Path, name: str | None = None) -> RunCurves:
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    records, cut = _records(path)
    records = _latest_attempt(records)
    train = _last_per_step(records, "tokens_seen")
    if not train:
        raise MetricsError(f"{path}: no training records (with tokens_seen)")
    curves = RunCurves(name or run_dir.name, cut_lines=cut)
    for r in train:
        curves.tokens.append(float(r["tokens_seen"]))
        curves.loss.append(r.get("loss"))
        curves.tokens_per_s.append(r.get("tokens_per_s"))
    peaks = [r["peak_mem_gib"] for r in train if r.get("peak_mem_gib") is not None]
    curves.peak_mem_gib = max(peaks) if peaks else None
    steps = [float(r["step"]) for r in train]
    for r in _last_per_step(records, "val_loss"):
        tokens = r.get("tokens_seen")
        curves.val_tokens.append(float(tokens) if tokens is not None else _interpolate(r["step"], steps, curves.tokens))
        curves.val_loss.append(float(r["val_loss"]))
    return curves


def check_image_path(path: str | Path) -> Path:
    """The image file a CLI is to write, refused (ValueError naming it) unless its extension names a format
    matplotlib writes: matplotlib adds .png to a name without one, so the file written would not be
    the one named, and it refuses another extension only once the figure is drawn."""
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(path)
    suffix = path.suffix.lower()
    formats = "(.png, .pdf, .svg, ...)"
    if not suffix:
        raise ValueError(f"{path}: no file extension {formats}")
    if suffix[1:] not in FigureCanvasBase.get_supported_filetypes():
        raise ValueError(f"{path}: {suffix} is not an image format matplotlib writes {formats}")
    if path.is_dir():
        raise ValueError(f"{path}: is a directory")
    return path


def _xy(xs: list, ys: list) -> tuple[list, list]:
    pairs = [(x, y) for x, y in zip(xs, ys) if y is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_curves(runs: Sequence[RunCurves], out: str | Path, title: str | None = None) -> Path:
    """One PNG with three panels (loss, validation loss, tokens/s against tokens), a line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), constrained_layout=True)
    panels = [
        ("training loss", "loss", "nats per token"),
        ("validation loss", "val_loss", "nats per token"),
        ("tokens/s", "tokens_per_s", "tokens per second"),
    ]
    for ax, (label, key, unit) in zip(axes, panels):
        tails = []
        for run in runs:
            xs = run.val_tokens if key == "val_loss" else run.tokens
            x, y = _xy(xs, getattr(run, key))
            if y:
                ax.plot(x, y, marker="o" if key == "val_loss" else None, markersize=3, label=run.name)
                tails += [v for t, v in zip(x, y) if t >= 0.1 * x[-1]]
        if key != "tokens_per_s" and len(tails) > 1:
            # the first tenth of training (loss ~ log(vocab) falling fast) would flatten the rest
            low, high = min(tails), max(tails)
            ax.set_ylim(low - 0.05 * (high - low + 1e-3), high + 0.05 * (high - low + 1e-3))
        ax.set_title(label)
        ax.set_xlabel("tokens")
        ax.set_ylabel(unit)
        ax.xaxis.set_major_formatter(EngFormatter())
        if key == "tokens_per_s":
            ax.yaxis.set_major_formatter(EngFormatter())
        ax.grid(alpha=0.3)
    axes[0].legend()
    if title:
        fig.suptitle(title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m retnet_train.plot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("runs", nargs="+", help="run directories (each with a metrics.jsonl)")
    p.add_argument("--out", required=True, help="the image to write: .png (or .pdf, .svg, ...)")
    p.add_argument(
        "--labels", default=None, help="comma-separated legend names, one per run (default: directory names)"
    )
    p.add_argument("--title", default=None, help="the figure's title (default: none)")
    a = p.parse_args(argv)
    labels = a.labels.split(",") if a.labels else [None] * len(a.runs)
    if len(labels) != len(a.runs):
        p.error(f"--labels has {len(labels)} names for {len(a.runs)} runs")
    try:
        check_image_path(a.out)
    except ValueError as e:
        p.error(f"--out {e}")
    try:
        runs = [read_metrics(run, label) for run, label in zip(a.runs, labels)]
    except MetricsError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    for run_dir, run in zip(a.runs, runs):
        for n in run.cut_lines:
            print(
                f"warning: {Path(run_dir) / METRICS_FILE}:{n}: a record cut short (a killed run); left out",
                file=sys.stderr,
            )
    print(f"wrote {plot_curves(runs, a.out, a.title)}")


if __name__ == "__main__":
    main()
