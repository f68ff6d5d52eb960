"""A sequence-length sweep of bench.train_throughput: the batch at each length and the plot. The plot
can also be drawn from the JSON lines of several runs (a long sweep split over machines or calls):

    python -m retnet_train.bench.sweep short.jsonl long.jsonl --plot sweep.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..plot import check_image_path

# what every point of one plot shares, besides the model's own settings
SHARED_SETTINGS = ("preset", "device", "zero_stage", "compile", "activation_memory_budget")
# what a row of bench.train_throughput has that the plot reads (other benchmarks' rows lack them)
ROW_KEYS = ("model", "preset", "seq_len", "micro_batch", "grad_accum")
# fla's rows: never compiled (compile false, budget 1.0 whatever the run asked for), the rest is shared
FLA_SETTINGS = ("preset", "device", "zero_stage")


def batch_for_length(seq_len: int, first_len: int, micro_batch: int, grad_accum: int) -> tuple:
    """(micro-batch, accumulation) at seq_len for a sweep whose first length runs micro_batch x
    grad_accum sequences per step: the tokens per micro-batch and per step stay those of the first
    length, as long as a micro-batch holds at least one sequence and a step one micro-batch."""
    tokens_micro, tokens_step = micro_batch * first_len, micro_batch * grad_accum * first_len
    mb = max(1, tokens_micro // seq_len)
    return mb, max(1, tokens_step // (mb * seq_len))


def model_label(result: dict) -> str:
    overrides = "".join(f"@{k}={v}" for k, v in (result.get("overrides") or {}).items())
    return f"{result['model']}{overrides}"


def sweep_tokens(row: dict) -> int:
    """The tokens per optimizer step of the sweep a row belongs to (those of its first length; a row
    without the field, of an older run, counts its own)."""
    return row.get("sweep_tokens_per_step") or row["micro_batch"] * row["grad_accum"] * row["seq_len"]


def sweep_lines(results: list) -> dict:
    """The plot's lines: (model label, sweep tokens per step) -> its rows."""
    lines = {}
    for r in results:
        if "skipped" not in r:
            lines.setdefault((model_label(r), sweep_tokens(r)), []).append(r)
    return lines


def plot_sweep(results: list, path: str, title: str) -> None:
    """tokens/s and peak memory against sequence length, one line per model (and tokens per step);
    an out-of-memory length is marked with an x on the length axis."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (speed, mem) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    lines = sweep_lines(results)
    for (label, tokens), rows in lines.items():
        ok = sorted((r for r in rows if "oom" not in r), key=lambda r: r["seq_len"])
        name = label if len({t for _, t in lines}) == 1 else f"{label} ({tokens:,} tokens per step)"
        (line,) = speed.plot([r["seq_len"] for r in ok], [r["tokens_per_s"] for r in ok], "o-", label=name)
        mem.plot([r["seq_len"] for r in ok], [r["peak_gib"] for r in ok], "o-", color=line.get_color(), label=name)
        for r in rows:
            if "oom" in r:
                for ax in (speed, mem):
                    ax.plot([r["seq_len"]], [0], "x", color=line.get_color(), markersize=10)
    for ax, ylabel in ((speed, "tokens / s"), (mem, "peak memory (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep_title(results: list) -> str:
    """What the plotted rows share: preset, device, tokens per step, ZeRO stage, compilation."""
    r = next((r for r in results if "tokens_per_s" in r), None)
    if r is None:
        return "no measured rows"
    steps = sorted({sweep_tokens(x) for x in results if "skipped" not in x})
    flags = f"ZeRO-{r['zero_stage']}" + (f", compiled, budget {r['activation_memory_budget']}" if r["compile"] else "")
    return f"{r['preset']} on {r['device']}: {' / '.join(f'{t:,}' for t in steps)} tokens per step, {flags}"


def read_rows(path: str) -> list:
    """The result rows of one run's output: lines that start with '{' and name a model (other lines, such
    as warnings that went to the same file or another benchmark's rows, are skipped)."""
    try:
        lines = open(path).read().splitlines()
    except FileNotFoundError:
        raise SystemExit(f"{path}: no such file") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise SystemExit(f"{path}:{number}: not a JSON result row: {line[:80]!r}") from None
            measured = "model" in rows[-1] and "skipped" not in rows[-1]  # (a skipped model's row names it only)
            missing = [key for key in ROW_KEYS if measured and key not in rows[-1]]
            if missing:
                raise SystemExit(f"{path}:{number}: not a train_throughput row (no {', '.join(missing)})")
    rows = [r for r in rows if "model" in r]  # retention_kernels and context_parallel rows name none
    if not rows:
        raise SystemExit(f"{path}: no result rows (the JSON lines that bench.train_throughput prints)")
    return rows


def sweep_settings(row: dict) -> tuple:
    return FLA_SETTINGS if row.get("model") == "fla" else SHARED_SETTINGS


def check_shared_settings(rows_by_file: dict, settings=sweep_settings, what: str = "sweep") -> None:
    """Rows of several runs are one sweep (or `what`) only if they were measured alike: the same value of
    each of settings(row) in every row that has it."""
    seen = {}
    for path, rows in rows_by_file.items():
        for r in rows:
            for key in settings(r):
                if key in r and seen.setdefault(key, (r[key], path))[0] != r[key]:
                    first, where = seen[key]
                    raise SystemExit(f"{key} differs: {first} in {where}, {r[key]} in {path}: not one {what}")


def image_path_or_error(parser: argparse.ArgumentParser, path: str) -> None:
    """--plot checked before any row is read (or any model measured): the parser's error otherwise."""
    try:
        check_image_path(path)
    except ValueError as e:
        parser.error(f"--plot {e}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m retnet_train.bench.sweep",
        description="Draw the sweep plot from the JSON lines of bench.train_throughput runs.",
    )
    p.add_argument("rows", nargs="+", metavar="JSONL", help="a run's output (its stdout, saved)")
    p.add_argument("--plot", required=True, metavar="PATH", help="the image to write: .png (or .pdf, .svg, ...)")
    args = p.parse_args(argv)
    image_path_or_error(p, args.plot)
    rows_by_file = {path: read_rows(path) for path in args.rows}
    check_shared_settings(rows_by_file)
    results = [r for rows in rows_by_file.values() for r in rows]
    plot_sweep(results, args.plot, sweep_title(results))
    print(f"wrote {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
