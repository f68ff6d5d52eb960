"""Module docstrings are the --help text of the commands: one that shows a shell example with a line
continuation must be a raw string, or Python joins the example's lines (backslash-newline is an escape),
and must hold one backslash there, not two (a raw string keeps both: the pasted example ends its command
at the first line)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p for d in ("retnet_train", "data_prep") for p in (ROOT / d).rglob("*.py"))


def docstring_source(path: Path):
    source = path.read_text()
    body = ast.parse(source).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        if isinstance(body[0].value.value, str):
            return ast.get_source_segment(source, body[0])
    return None


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_docstring_with_a_line_continuation_is_raw(path):
    doc = docstring_source(path)
    if doc is not None and "\\\n" in doc:
        assert doc[0] in "rR", f'{path.relative_to(ROOT)}: its docstring has a \'\\\' line continuation; make it r"""'


def test_the_check_sees_an_eaten_continuation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('"""Run:\n    python -m x --a 1 \\\n        --b 2\n"""\n')
    assert "\\\n" in docstring_source(bad) and docstring_source(bad)[0] == '"'
    assert ast.parse(bad.read_text()).body[0].value.value == "Run:\n    python -m x --a 1         --b 2\n"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_docstring_line_continuation_is_one_backslash(path):
    doc = ast.get_docstring(ast.parse(path.read_text()), clean=False)
    assert not (doc and "\\\\\n" in doc), f"{path.relative_to(ROOT)}: its --help shows '\\\\' before a line end"
