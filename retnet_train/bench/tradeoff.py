"""Speed against memory across activation memory budgets: the rows of bench.train_throughput runs at one
sequence length, drawn as tokens/s against peak memory, one line per model and activation
checkpointing, each point labelled with its budget:

    python -m retnet_train.bench.tradeoff a.jsonl b.jsonl --seq-len 32768 --plot tradeoff.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .sweep import check_shared_settings, image_path_or_error, model_label, read_rows

# what every point of one plot shares; the budget and the checkpointing are what the plot varies
SHARED = ("preset", "device", "zero_stage", "compile", "seq_len", "micro_batch", "grad_accum")
# the models whose blocks have a retention mix for `selective` to recompute: for the others a
# selective row is a run without checkpointing (parallel.parallelize wraps retention mixes only)
SELECTIVE_MODELS = ("retnet",)


def checkpointing(row: dict) -> str:
    mode = row.get("activation_checkpointing", "none")
    return "none" if mode == "selective" and row["model"] not in SELECTIVE_MODELS else mode


def tradeoff_lines(rows: list) -> dict:
    """(model label, checkpointing) -> [(budget, peak GiB, tokens/s)], by budget."""
    lines = {}
    for r in rows:
        point = (r["activation_memory_budget"], r["peak_gib"], r["tokens_per_s"])
        lines.setdefault((model_label(r), checkpointing(r)), []).append(point)
    return {key: sorted(points) for key, points in lines.items()}


def point_labels(points: list) -> dict:
    """(peak, tokens/s) -> its budgets as one label: budgets whose peaks lie within 0.1 GiB (where
    two budgets keep the same tensors) share one, "0.55, 0.6", that would otherwise overprint."""
    labels = {}
    for budget, peak, speed in points:
        key = next((k for k in labels if abs(k[0] - peak) < 0.1), (peak, speed))
        labels.setdefault(key, []).append(f"{budget:g}")
    return {key: ", ".join(budgets) for key, budgets in labels.items()}


def measured_at(rows_by_file: dict, seq_len: int) -> list:
    """The measured rows at seq_len of all files, refused unless they share SHARED."""
    picked = {
        path: [r for r in rows if "tokens_per_s" in r and r["seq_len"] == seq_len]  # (not skipped, not OOM)
        for path, rows in rows_by_file.items()
    }
    check_shared_settings(picked, lambda row: SHARED, "plot")
    rows = [r for rows in picked.values() for r in rows]
    if not rows:
        raise SystemExit(f"no measured rows at sequence length {seq_len} in {', '.join(rows_by_file)}")
    return rows


def plot_tradeoff(rows: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5), constrained_layout=True)
    offsets = [(4, 5), (4, -11), (-24, -11), (-24, 5)]  # lines that share points keep their labels apart
    for i, ((label, mode), points) in enumerate(tradeoff_lines(rows).items()):
        _, peaks, speeds = zip(*points)
        name = label if mode == "none" else f"{label}, {mode}"
        (line,) = ax.plot(peaks, speeds, "o-", label=name)
        for (peak, speed), budgets in point_labels(points).items():
            ax.annotate(
                budgets,
                (peak, speed),
                textcoords="offset points",
                xytext=offsets[i % len(offsets)],
                fontsize=7,
                color=line.get_color(),
            )
    r = rows[0]
    ax.set_title(
        f"{r['preset']} on {r['device']}: sequence {r['seq_len']:,}, {r['micro_batch']} x {r['grad_accum']}, "
        f"ZeRO-{r['zero_stage']}{', compiled' if r['compile'] else ''}\npoint labels: activation memory budget",
        fontsize=8,
    )
    ax.set_xlabel("peak memory (GiB)")
    ax.set_ylabel("tokens / s")
    ax.set_ylim(bottom=0)
    ax.margins(x=0.1)  # room for the labels of the outermost points
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m retnet_train.bench.tradeoff",
        description="Draw tokens/s against peak memory across activation memory budgets.",
    )
    p.add_argument("rows", nargs="+", metavar="JSONL", help="a bench.train_throughput run's output (its stdout, saved)")
    p.add_argument("--seq-len", type=int, required=True, help="the sequence length whose rows are drawn")
    p.add_argument("--plot", required=True, metavar="PATH", help="the image to write: .png (or .pdf, .svg, ...)")
    args = p.parse_args(argv)
    image_path_or_error(p, args.plot)
    rows = measured_at({path: read_rows(path) for path in args.rows}, args.seq_len)
    plot_tradeoff(rows, args.plot)
    print(f"wrote {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
