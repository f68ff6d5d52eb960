"""bench.quality's outputs: the rows (quality.jsonl), the markdown table (quality.md) and the loss curves
(curves.png) of every model benchmarked in an output directory."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Sequence

ROWS_FILE, TABLE_FILE, PLOT_FILE = "quality.jsonl", "quality.md", "curves.png"


class BenchError(ValueError):
    """A bad argument or input; the message names it."""


def load_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise BenchError(f"{path}:{n}: not a JSON line") from None
    return rows


def merge_rows(old: list[dict], new: list[dict], order: Sequence[str]) -> list[dict]:
    """Old rows with the new ones replacing those of the same model, in `order` (model names), then by
    their spec."""
    rows = {r["model"]: r for r in old}
    rows.update({r["model"]: r for r in new})
    order = list(order)

    def rank(row):  # a model this version does not know (an older file's row) goes last, kept
        base = row["model"].split(":")[0]
        return (order.index(base) if base in order else len(order), row["model"])

    return sorted(rows.values(), key=rank)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 100_000 else f"{n:,}"


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| model | parameters | tokens | val loss | val ppl | tokens/s | peak GiB | loop |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['model']}`: {r['description']} | {_count(r['params'])} | {_count(r['tokens'])} "
            f"| {_fmt(r['val_loss'], '.3f')} | {_fmt(r['val_ppl'], '.2f')} "
            f"| {_fmt(r['tokens_per_s'], ',.0f')} "
            f"| {_fmt(r['peak_mem_gib'], '.1f')} | {r['loop']} |"
        )
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # a reader sees the old table or the new one


def readable_curves(out: Path, rows: list[dict]) -> list:
    """The curves of each row's run; a run that cannot be read (an earlier row's run directory removed) is
    left out of the plot, named on stderr: the rows and the table keep it."""
    from ..plot import MetricsError, read_metrics

    curves = []
    for r in rows:
        try:
            curves.append(read_metrics(out / r["run_dir"], r["model"]))
        except MetricsError as e:
            print(f"warning: {PLOT_FILE} leaves out {r['model']}: {e}", file=sys.stderr)
    return curves


def write_outputs(out: Path, rows: list[dict]) -> None:
    from ..plot import plot_curves

    _write(out / ROWS_FILE, "".join(json.dumps(r) + "\n" for r in rows))
    _write(out / TABLE_FILE, markdown_table(rows))
    first = rows[0]
    title = f"{_count(first['tokens'])} tokens, seq {first['seq_len']}, {first['batch_tokens']:,} tokens/step"
    curves = readable_curves(out, rows)
    if curves:
        plot_curves(curves, out / PLOT_FILE, title)
