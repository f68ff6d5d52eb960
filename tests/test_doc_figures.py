"""The measured figures of the docs equal the JSON lines behind them (docs/runs/*.jsonl).

tests/doc_figures.txt lists figures as the docs show them, each with the rows file, the row's settings
and label (its revision) and the fields it shows: the doc must still show the figure and the row's
field must round to it. The ratio columns of the RetNet-against-Transformer tables and the ratios in
prose are recomputed from the numbers they are drawn from, and the README's figures without rows of
their own from the doc tables they cite.
"""

from __future__ import annotations

import json
import re
import shlex
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "docs" / "runs"
CLAIMS_FILE = Path(__file__).with_name("doc_figures.txt")
MISSING = object()

# Settings that name a row's nested or alternative keys.
SHORTHAND = {
    "rev": ("revision", "retnet_train_commit"),
    "chunk": ("overrides.chunk_size",),
    "backend_override": ("overrides.retention_backend",),
}


def setting_value(key: str, text: str):
    if key == "rev":
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def pairs(text: str, parse_values: bool) -> dict:
    items = dict(item.split("=", 1) for item in shlex.split(text))
    return {k: setting_value(k, v) for k, v in items.items()} if parse_values else items


def parse_block(lines: list, where: str) -> dict:
    """One claim: {'where', 'doc', 'runs', 'shows', 'rows': [(settings, {field: figure})]}."""
    doc, runs = lines[0].split()
    claim = {"where": where, "doc": doc, "runs": runs, "shows": None, "rows": []}
    common = {}
    for line in lines[1:]:
        word, _, rest = line.partition(" ")
        if word == "shows":
            claim["shows"] = rest
        elif word == "with":
            common = pairs(rest, parse_values=True)
        elif word == "row":
            settings, _, figures = rest.partition(": ")
            claim["rows"].append(({**common, **pairs(settings, True)}, pairs(figures, False)))
        else:
            raise ValueError(f"{where}: {line!r} is not a 'shows', 'with' or 'row' line")
    if not claim["shows"] or not claim["rows"]:
        raise ValueError(f"{where}: a block needs a 'shows' line and at least one 'row' line")
    return claim


def load_claims() -> list:
    blocks, current = [], []
    for n, line in enumerate(CLAIMS_FILE.read_text().splitlines(), 1):
        if line.startswith("#"):
            continue
        if line.strip():
            current.append((n, line))
        elif current:
            blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    return [parse_block([text for _, text in b], f"{CLAIMS_FILE.name}:{b[0][0]}") for b in blocks]


@cache
def rows(name: str) -> list:
    return [json.loads(line) for line in (RUNS / name).read_text().splitlines() if line.strip()]


@cache
def doc_text(doc: str) -> str:
    return normalized((ROOT / doc).read_text())


def field(row: dict, path: str):
    """A row's value at a dotted path (list items by index; a kernel's [name, us] gives its us); a+b sums."""
    if "+" in path:
        parts = [field(row, p) for p in path.split("+")]
        return MISSING if MISSING in parts else sum(parts)
    value = row
    for part in path.split("."):
        if isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
            value = value[1] if isinstance(value, list) and len(value) == 2 else value
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            return MISSING
    return value


def matches(row: dict, settings: dict) -> bool:
    return all(any(field(row, p) == want for p in SHORTHAND.get(k, (k,))) for k, want in settings.items())


def shows(value, shown: str) -> bool:
    """value rounds to shown, to shown's decimals (a half either way)."""
    if value is MISSING or value is None:
        return False
    text = shown.replace(",", "").strip("*")
    decimals = len(text.partition(".")[2])
    return abs(float(value) - float(text)) <= 0.5 * 10**-decimals + 1e-9


def normalized(text: str) -> str:
    return re.sub(r"\s+", " ", text)


CLAIMS = load_claims()


def test_the_claims_cover_every_rows_file_the_docs_link():
    linked = set(re.findall(r"runs/([\w.-]+\.jsonl)", " ".join(doc_text(c["doc"]) for c in CLAIMS)))
    assert linked <= {c["runs"] for c in CLAIMS}


@pytest.mark.parametrize("claim", CLAIMS, ids=[c["where"] for c in CLAIMS])
def test_a_figure_equals_its_row(claim):
    doc, runs = claim["doc"], claim["runs"]
    assert normalized(claim["shows"]) in doc_text(doc), f"{claim['where']}: {doc} does not show {claim['shows']!r}"
    for settings, figures in claim["rows"]:
        found = [r for r in rows(runs) if matches(r, settings)]
        assert found, f"{claim['where']}: docs/runs/{runs} has no row with {settings}"
        wrong = {
            path: [field(r, path) for r in found]
            for path, figure in figures.items()
            if not any(shows(field(r, path), figure) for r in found)
        }
        assert not wrong, f"{claim['where']}: {doc} shows {figures}; the rows with {settings} hold {wrong}"


# Tables whose columns give RetNet / Transformer ratios: (header start, RetNet column, Transformer
# column, tokens/s ratio column, peak ratio column or None). A cell's first number is its tokens/s,
# its second the peak GiB; an empty Transformer cell stands for the row above's.
RATIO_TABLES = [
    ("| size, sequence, micro-batch x accumulation | code |", 2, 3, 4, 5),
    ("| sequence, micro-batch x accumulation | RetNet |", 1, 2, 3, 4),
    ("| budget | RetNet | Transformer |", 1, 2, 3, 4),
    ("| sequence x micro-batch x accumulation, budget |", 1, 2, 3, 4),
    ("| 1.3B: sequence x micro-batch x accumulation, budget |", 1, 3, 4, 5),
    ("| 1.3B: sequence x micro-batch x accumulation, budget |", 2, 3, 6, 7),
    ("| budget | RetNet: tokens/s, peak GiB", 1, 2, 3, 4),
    ("| size, setting | RetNet | Transformer | fla RetNet |", 1, 2, 4, None),
    ("| size, setting | RetNet (torch chunk 256) |", 1, 3, 4, None),
]


def table_rows(text: str, header: str) -> list:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    body = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        body.append([c.strip() for c in line.strip("|").split("|")])
    return body


def numbers(text: str) -> list:
    return [float(n.replace(",", "")) for n in re.findall(r"\d[\d,]*\.?\d*", text.replace("*", ""))]


def ratio_cases():
    text = (ROOT / "docs/benchmarks.md").read_text()
    for header, retnet, transformer, speed, peak in RATIO_TABLES:
        above = None
        for cells in table_rows(text, header):
            above = numbers(cells[transformer]) or above
            if cells[speed]:
                yield pytest.param(numbers(cells[retnet]), above, cells, speed, peak, id=cells[0][:40])


@pytest.mark.parametrize("retnet, transformer, cells, speed, peak", list(ratio_cases()))
def test_a_ratio_column_recomputes_from_its_cells(retnet, transformer, cells, speed, peak):
    assert shows(retnet[0] / transformer[0], cells[speed].strip("*x")), f"tokens/s ratio of {cells}"
    if peak is not None:
        assert shows(retnet[1] / transformer[1], cells[peak].strip("*x")), f"peak ratio of {cells}"


# Ratios and changes in prose: (doc, text, a, b, shown); "x": a / b, "%": |a / b - 1| in percent.
PROSE = [
    ("docs/benchmarks.md", "its backward grows 3% from 0.5 to 0.3, RetNet's 7.4%", 434.5, 404.4, "7.4%"),
    ("docs/benchmarks.md", "its backward grows 3% from 0.5 to 0.3", 993.8, 962.4, "3%"),
    ("docs/benchmarks.md", "its activations fall 34% from 0.5 to 0.4", 23.01, 34.81, "34%"),
    ("docs/benchmarks.md", "RetNet's 10%", 26.62, 29.49, "10%"),
    ("docs/benchmarks.md", "14.0 / 11.8 = 1.19", 14.0, 11.8, "1.19x"),
    ("docs/benchmarks.md", "RetNet's backward 15% less", 173.5, 203.8, "15%"),
    ("docs/benchmarks.md", "runs 2.8% slower than at 0.5 without it", 49986.7, 51452.1, "2.8%"),
    ("docs/benchmarks.md", "RetNet at chunk 256 is 0.95x", 368594.7, 388845.0, "0.95x"),
    ("docs/benchmarks.md", "(0.86x at chunk 64)", 332714.8, 388845.0, "0.86x"),
    ("docs/benchmarks.md", "RetNet 56,691, the Transformer 49,269 (1.15x)", 56691.4, 49268.7, "1.15x"),
    ("docs/benchmarks.md", "(1.16x / 2.02x / 3.19x)", 59160.9, 18544.9, "3.19x"),
    ("docs/benchmarks.md", "runs 4.8% faster than with the graph break", 54576.8, 52083.9, "4.8%"),
    ("docs/scaling.md", "1.85-1.88x one GPU's tokens/s", 49572.3, 26732.1, "1.85x"),
    ("docs/scaling.md", "1.85-1.88x one GPU's tokens/s", 43062.0, 22852.8, "1.88x"),
    ("docs/quality.md", "Transformer++ is 0.9% above", 5.212, 5.164, "0.9%"),
    ("docs/quality.md", "our trainer ends 0.4% below", 5.285, 5.305, "0.4%"),
    ("docs/model.md", "5.7 GiB lighter and 2.8% slower", 49986.7, 51452.1, "2.8%"),
    ("README.md", "2.08x the speed at 0.75x the memory", 52637.0, 25284.2, "2.08x"),
    ("README.md", "2.08x the speed at 0.75x the memory", 41.21, 55.29, "0.75x"),
    ("docs/benchmarks.md", "(`selective`) gives 2.08x at 0.75x at budget 0.6", 52637.0, 25284.2, "2.08x"),
    ("docs/benchmarks.md", "both models at budget 0.5 give 2.17x the tokens/s at 0.90x", 47.02, 52.34, "0.90x"),
]


@pytest.mark.parametrize("doc, text, a, b, shown", PROSE, ids=[f"{p[1][:40]} {p[4]}" for p in PROSE])
def test_a_ratio_in_prose_recomputes(doc, text, a, b, shown):
    assert normalized(text) in doc_text(doc), f"{doc} does not show {text!r}"
    value = a / b if shown.endswith("x") else abs(a / b - 1) * 100
    assert shows(value, shown[:-1]), f"{doc}: {text!r}: {a} / {b} gives {value:.4f}, not {shown}"


# README figures without rows in docs/runs: (README text, doc, the doc's text they come from).
CITED = [
    (
        "53,047 tokens/s in 34.2 GiB against the Transformer's 45,527 in 37.1 GiB",
        "docs/benchmarks.md",
        "| 0.5 | 53,047, 34.24 (16.71), 13.0 | 45,527, 37.14 (19.61), 15.2 |",
    ),
    ("**1,107 tokens/s**, 2.0 GiB over the weights", "docs/benchmarks.md", "| 8 | 7.23 | 1,107 | 2.04 GiB |"),
    ("| 663, 32.2 GiB (KV cache) |", "docs/benchmarks.md", "| 5.36 / 12.06 / OOM | 187 / 663 / - | 4.04 / 32.2 GiB"),
]


@pytest.mark.parametrize("text, source, cited", CITED, ids=[c[0][:40] for c in CITED])
def test_a_readme_figure_equals_the_doc_it_cites(text, source, cited):
    assert normalized(text) in doc_text("README.md"), f"README.md does not show {text!r}"
    assert normalized(cited) in doc_text(source), f"{source} does not show {cited!r}"
    missing = [
        f for f in re.findall(r"\d[\d,]*\.?\d*", text.replace("*", "")) if not any(shows(v, f) for v in numbers(cited))
    ]
    assert not missing, f"README.md: {missing} of {text!r} are not in {source}'s {cited!r}"
