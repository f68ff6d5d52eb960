"""The repository describes the product as it is.

Docs, configs and the Python sources' comments and docstrings carry no narrative of how or when the
code was built, no reference to documents or targets outside the repository and no web links; every
relative link, repository path and `python -m` module named in the docs exists.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import re
import tokenize
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "runs", "data", "build", "node_modules"}

# (pattern, why it is refused); case-insensitive, matched per line.
NARRATIVE = [
    (r"\bsessions?[ -]?\d", "names a work session"),
    (r"\b(?:this|next|last|previous|that) session\b", "names a work session"),
    (r"(?:\.\./|/work/)shared\b", "points outside the repository"),
    (r"https?://", "links outside the repository"),
    (r"\bissues? ?#?\d", "refers to an issue"),
    (r"\bthe issue(?:'s)?\b", "refers to an issue"),
    (r"\b(?:before|until|since|after) 20\d\d-\d\d", "dates a change"),
    (r"\b(?:ours|we|us)\b[^.]{0,30}\bbefore 20\d\d", "dates a change"),
    (r"\bwe (?:tried|changed|fixed|found|removed|added)\b", "narrates the work"),
    (r"\btried and\b|\buntil now\b|\bno longer\b", "narrates the work"),
    (r"\bwas\b[^;]{0,40}\bnow\b", "narrates a change (was X, now Y)"),
    (r"\bagainst the targets?\b|\btargets? (?:is |are )?(?:not )?met\b|\bnot met\b|\bstretch\b", "refers to a target"),
    (r"\btargets? from\b|\btarget\s*(?:<=|>=|[<>\u2264\u2265])|\b[\d.]+x target\b", "refers to a target"),
    (r"\bwas lent\b|\bbudget was spent\b|\bno device time\b", "narrates how a figure was taken"),
]
NARRATIVE_RE = [(re.compile(p, re.IGNORECASE), why) for p, why in NARRATIVE]


def repo_files(pattern: str):
    for path in sorted(ROOT.glob(pattern)):
        parts = path.relative_to(ROOT).parts[:-1]
        if path.is_file() and not any(p in SKIP_DIRS or p.startswith(".") or p.endswith(".egg-info") for p in parts):
            yield path


def markdown_files():
    return list(repo_files("**/*.md"))


def python_prose(path: Path):
    """(line, text) of every comment and docstring of a Python file."""
    source = path.read_text(encoding="utf-8")
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            yield tok.start[0], tok.string
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                first = body[0].lineno
                for i, line in enumerate(body[0].value.value.splitlines()):
                    yield first + i, line


def prose_lines():
    """(file, line, text) for the docs, the configs and the Python sources' comments and docstrings."""
    for path in [*markdown_files(), *repo_files("configs/**/*.yaml")]:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            yield path, n, line
    for top in ("retnet_train", "data_prep", "tests", "launch"):
        for path in repo_files(f"{top}/**/*.py"):
            for n, line in python_prose(path):
                yield path, n, line


# A package index in an install command (pip's --index-url) is an address to type, not a link to read.
INDEX_URL = re.compile(r"--(?:extra-)?index-url[ =]\S+")


def narrative_hits(lines) -> list:
    hits = []
    for path, n, line in lines:
        line = INDEX_URL.sub("", line)
        for regex, why in NARRATIVE_RE:
            m = regex.search(line)
            if m:
                hits.append(f"{path.relative_to(ROOT)}:{n}: {why}: {m.group(0)!r}")
    return hits


def test_no_narrative_outside_links_or_targets():
    hits = narrative_hits(prose_lines())
    assert not hits, "describe the product as it is:\n" + "\n".join(hits)


@pytest.mark.parametrize(
    "text,caught",
    [
        ("figures of session 8", True),
        ("see ../shared/retnet.md", True),
        ("[ui](https://x.org)", True),
        ("weights saved before 2026-11-29 load", True),
        ("the issue's reference", True),
        ("the 1.35x target is not met", True),
        ("Against the targets", True),
        ("it was 52.9 ms, now 35.1", True),
        ("we tried a kernel", True),
        ("H200, 2026-11-29, torch 2.11.0", False),
        ("`make help` lists the targets of the Makefile", False),
        ("a test session fixture", False),
        ("pip install --index-url https://download.pytorch.org/whl/rocm6.2 torch", False),
    ],
)
def test_the_patterns_catch_narrative(text, caught):
    assert bool(narrative_hits([(ROOT / "x.md", 1, text)])) == caught


# ---- links and names in the docs -------------------------------------------------------------

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
REPO_PATH = re.compile(r"^(?:retnet_train|data_prep|configs|launch|docs|tests)/[\w./-]*$")
MODULE = re.compile(r"(?:python3? -m|torchrun\b[^`\n]*?-m|--module)\s+((?:retnet_train|data_prep)(?:\.\w+)*)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set:
    heads = re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", strip_fenced(path.read_text(encoding="utf-8")), re.MULTILINE)
    return {slug(h) for h in heads}


def strip_fenced(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)


def test_relative_links_point_to_existing_files_and_headings():
    bad = []
    for path in markdown_files():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for m in LINK.finditer(line):
                target = m.group(1) or m.group(2)
                if re.match(r"^[a-z]+:", target):
                    continue  # a scheme: the narrative test refuses web links
                file_part, _, anchor = target.partition("#")
                dest = (path.parent / file_part).resolve() if file_part else path
                where = f"{path.relative_to(ROOT)}:{n}: {target}"
                if not dest.exists():
                    bad.append(f"{where}: no such file")
                elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                    bad.append(f"{where}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, "\n".join(bad)


def module_exists(dotted: str) -> bool:
    base = ROOT.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__main__.py").is_file() or (base / "__init__.py").is_file()


def test_paths_and_modules_named_in_the_docs_exist():
    bad = []
    for path in markdown_files():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            where = f"{path.relative_to(ROOT)}:{n}"
            for m in MODULE.finditer(line):
                if not module_exists(m.group(1)):
                    bad.append(f"{where}: no module {m.group(1)}")
            for m in CODE_SPAN.finditer(line):
                span = m.group(1).rstrip("/")
                if REPO_PATH.match(span) and not (ROOT / span).exists():
                    bad.append(f"{where}: no such path {span}")
    assert not bad, "\n".join(bad)


# ---- config keys and command-line options in the docs ----------------------------------------

SECTIONS = "model|data|optim|deepspeed|train|parallel|checkpoint|wandb|profile|run"
# `section.key` not inside a path, a module name or a quote; a key followed by `.` is a module path
CONFIG_KEY = re.compile(rf"(?<![\w./'$-])({SECTIONS})\.([a-z_]\w*)\b(?![.\w])")
FILE_SUFFIXES = {"md", "sh", "py", "json", "jsonl", "yaml", "safetensors", "pt", "png", "txt", "model"}


def config_keys() -> set:
    from retnet_train.components.config import TrainConfig
    from retnet_train.model.config import RetNetConfig, TransformerConfig

    keys = {f"model.{f.name}" for cls in (RetNetConfig, TransformerConfig) for f in dataclasses.fields(cls)}
    keys.add("model.arch")
    for section, typ in typing.get_type_hints(TrainConfig).items():
        if dataclasses.is_dataclass(typ):
            keys |= {f"{section}.{f.name}" for f in dataclasses.fields(typ)}
    return keys


def test_config_keys_named_in_the_docs_exist():
    known, bad = config_keys(), []
    for path in markdown_files():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for m in CONFIG_KEY.finditer(line):
                if m.group(2) not in FILE_SUFFIXES and m.group(0) not in known:
                    bad.append(f"{path.relative_to(ROOT)}:{n}: no config key {m.group(0)}")
    assert not bad, "\n".join(bad)


def joined_lines(path: Path):
    """(first line number, text) with shell line continuations joined."""
    lines, out, n = path.read_text(encoding="utf-8").splitlines(), [], 0
    while n < len(lines):
        first, text = n + 1, lines[n]
        while text.rstrip().endswith("\\") and n + 1 < len(lines):
            n += 1
            text = text.rstrip()[:-1] + " " + lines[n].strip()
        out.append((first, text))
        n += 1
    return out


COMMAND = re.compile(
    r"(?:python3? -m|torchrun\b[^`\n]*?-m|--module)\s+((?:retnet_train|data_prep)(?:\.\w+)*)([^`|\n#]*)"
)
SCRIPT = re.compile(r"\b(launch/(?:slurm/)?[\w]+\.(?:sh|sbatch))\b([^`|\n#]*)")
OPTION = re.compile(r"(?<![\w-])--[a-z][\w-]*")
HYDRA_OPTIONS = {"--cfg", "--resolve", "--package", "--info", "--multirun", "--config-name", "--config-path"}


def defining_sources(dotted: str) -> str:
    """The Python sources beside a module (a package: its own), where its argparse options are defined."""
    base = ROOT.joinpath(*dotted.split("."))
    folder = base if base.is_dir() else base.parent
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.py")))


def test_options_of_the_commands_in_the_docs_exist():
    """Every `--option` after a `python -m` module or a launch script in the docs is one that it defines."""
    sources, bad = {}, []
    for path in markdown_files():
        for n, line in joined_lines(path):
            where = f"{path.relative_to(ROOT)}:{n}"
            for m in COMMAND.finditer(line):
                module = m.group(1)
                if not module_exists(module):
                    continue  # test_paths_and_modules_named_in_the_docs_exist names it
                text = sources.setdefault(module, defining_sources(module))
                for opt in OPTION.findall(m.group(2)):
                    hydra = module == "retnet_train.train" and opt in HYDRA_OPTIONS
                    if opt != "--help" and not hydra and f'"{opt}"' not in text and f"'{opt}'" not in text:
                        bad.append(f"{where}: python -m {module} has no option {opt}")
            for m in SCRIPT.finditer(line):
                script = ROOT / m.group(1)
                if not script.is_file():
                    continue
                text = sources.setdefault(m.group(1), script.read_text(encoding="utf-8"))
                text += "".join(p.read_text(encoding="utf-8") for p in sorted(script.parent.glob("common.sh")))
                for opt in OPTION.findall(m.group(2).split(" -- ")[0]):
                    if opt != "--help" and not re.search(re.escape(opt) + r"(?![\w-])", text):
                        bad.append(f"{where}: {m.group(1)} has no option {opt}")
    assert not bad, "\n".join(bad)


def test_the_model_call_in_model_md_is_the_models_forward():
    """docs/model.md shows RetNet's forward call, with its defaults, and names the Transformer's arguments."""
    import inspect

    from retnet_train.model import RetNetForCausalLM, TransformerForCausalLM

    def params(cls):
        return [n for n in inspect.signature(cls.forward).parameters if n != "self"]

    text = (ROOT / "docs" / "model.md").read_text(encoding="utf-8")
    call = ast.parse(re.search(r"```python\n(out = model\(.*?)```", text, re.DOTALL).group(1)).body[0].value
    assert [a.id for a in call.args] + [k.arg for k in call.keywords] == params(RetNetForCausalLM)
    signature = inspect.signature(RetNetForCausalLM.forward).parameters
    assert {k.arg: ast.literal_eval(k.value) for k in call.keywords} == {
        k.arg: signature[k.arg].default for k in call.keywords
    }
    transformer = re.search(r"the Transformer's takes (.*?) \(", text, re.DOTALL).group(1)
    assert re.findall(r"`(\w+)`", transformer) == params(TransformerForCausalLM)


TEST_ONLY_KEYS = {"train.inject_nonfinite_at", "train.inject_nonfinite_grad_at"}  # fault injection for the tests


def test_the_config_table_of_training_md_lists_every_key_of_its_section():
    """docs/training.md's table of sections names each section's keys bare (`lr`): every one must be a key of
    that section, and every key of the schema (but the tests' fault injection) must be there."""
    from retnet_train.components.config import TrainConfig

    text = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `(\w+)` \| (.*) \|$", text, re.MULTILINE))
    sections = {s: t for s, t in typing.get_type_hints(TrainConfig).items() if dataclasses.is_dataclass(t)}
    assert set(rows) == set(sections)
    for section, typ in sections.items():
        listed = {f"{section}.{k}" for k in re.findall(r"`(\w+)`", rows[section])}
        schema = {f"{section}.{f.name}" for f in dataclasses.fields(typ)} - TEST_ONLY_KEYS
        assert listed == schema, f"docs/training.md, `{section}` row: {sorted(listed ^ schema)}"


def option_rows(text: str) -> list:
    """(keys, values column) of the table under docs/model.md's `## Options`."""
    section = text.split("## Options", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (`\w+`(?:, `\w+`)*) \| (.*) \|$", section, re.MULTILINE)
    return [(re.findall(r"`(\w+)`", keys), values) for keys, values in rows]


def first_value(text: str) -> str:
    return re.search(r"`([^`]+)`|\b(\d+)\b", text).group(0).strip("`")


def test_the_model_options_table_gives_the_config_defaults():
    """docs/model.md lists each option's default first: `a`, b for two keys, `a`; `b` per key, or one value for all."""
    from retnet_train.model.config import RetNetConfig

    defaults = {f.name: f.default for f in dataclasses.fields(RetNetConfig)}
    rows = option_rows((ROOT / "docs" / "model.md").read_text(encoding="utf-8"))
    assert len(rows) >= 8
    for keys, values in rows:
        groups = re.split(r";\s*|,\s*(?=\d|`)", values)
        if len(keys) == 1 or len(groups) < len(keys):  # one value for every key of the row
            shown = [first_value(values)] * len(keys)
        else:
            shown = [first_value(group) for group in groups[: len(keys)]]
        for key, value in zip(keys, shown):
            default = defaults[key]
            expected = str(default).lower() if isinstance(default, bool) else str(default)
            assert value == expected, f"docs/model.md options: {key} shows {value!r}, its default is {expected!r}"
