"""Every `python -m retnet_train...` / `data_prep...` command in the docs' bash blocks parses.

Each command's arguments go through that module's own argument parser (its `parse_args`, else its
`build_parser`, else its `main` stopped as soon as it has parsed), so a renamed option, a value the
parser refuses or a check between options fails here; nothing is run. `retnet_train.train` takes Hydra
overrides, not options: test_docs.py checks their config keys. Every `launch/` script command (also
under `sbatch`) runs with `--dry-run`, in a fake SLURM allocation for the sbatch scripts, and must pass
its overrides through. The Hydra overrides of every trainer command (`python -m retnet_train.train`, or a
launch script that runs it) compose into the trainer's typed config, with its value checks.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "runs", "data", "build", "node_modules", "tests"}
BASH_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)
# what the docs write in place of a value; the value that stands for it here
PLACEHOLDERS = {"P": "2", "N": "2"}
NOT_ARGPARSE = {"retnet_train.train"}  # Hydra overrides


def doc_files() -> list:
    return [
        p
        for p in sorted(ROOT.glob("**/*.md"))
        if not any(part in SKIP_DIRS or part.startswith(".") for part in p.relative_to(ROOT).parts[:-1])
    ]


def shell_lines(block: str):
    """(offset of the first line, text) of a bash block, line continuations joined."""
    lines, n = block.splitlines(), 0
    while n < len(lines):
        first, text = n, lines[n]
        while text.rstrip().endswith("\\") and n + 1 < len(lines):
            n += 1
            text = text.rstrip()[:-1] + " " + lines[n].strip()
        yield first, text
        n += 1


def unbracket(token: str) -> str:
    """`[--opt` -> `--opt`, `value]` -> `value`, `[a|b]` -> `a|b` (optional parts); a list's `[x,y]` stays."""
    token = token.lstrip("[") if token.startswith("[-") or token.startswith("[") and "|" in token else token
    while token.endswith("]") and token.count("]") > token.count("["):
        token = token[:-1]
    return token


def alternatives(argv: list) -> list:
    """The argument lists a command stands for: each choice of `a|b|c` once, placeholders filled in."""
    argv = [PLACEHOLDERS.get(a, a) for a in argv]
    choices = [a.split("|") if "|" in a and not a.startswith(("{", "[")) else [a] for a in argv]
    first = [c[0] for c in choices]
    return [first] + [[*first[:i], other, *first[i + 1 :]] for i, c in enumerate(choices) for other in c[1:]]


def command_in(line: str):
    """(module, arguments) of a `python -m` / `torchrun ... -m` command line, or None."""
    tokens = shlex.split(line, comments=True)
    for stop in (">", ">>", "|", "&&", ";", "2>&1"):
        tokens = tokens[: tokens.index(stop)] if stop in tokens else tokens
    if "-m" not in tokens[:-1]:
        return None
    at = len(tokens) - 1 - tokens[::-1].index("-m")  # torchrun's, or python's
    return tokens[at + 1], [unbracket(t) for t in tokens[at + 2 :]]


def doc_bash_lines():
    """(where: "file:line", line) of each shell line in the docs' bash blocks."""
    for path in doc_files():
        text = path.read_text(encoding="utf-8")
        for block in BASH_BLOCK.finditer(text):
            start = text[: block.start()].count("\n") + 2
            for offset, line in shell_lines(block.group(1)):
                yield f"{path.relative_to(ROOT)}:{start + offset}", line


def doc_commands() -> list:
    """(where, module, arguments) of each of our modules' commands in the docs' bash blocks."""
    found = []
    for where, line in doc_bash_lines():
        command = command_in(line)
        if command and command[0].split(".")[0] in ("retnet_train", "data_prep") and command[0] not in NOT_ARGPARSE:
            found.append((where, *command))
    return found


class Parsed(Exception):
    pass


def parse(module: str, argv: list):
    """The module's parse of argv, without running it; SystemExit where the parser refuses argv."""
    m = importlib.import_module(module)
    if not hasattr(m, "main"):
        m = importlib.import_module(f"{module}.__main__")
    m = sys.modules[m.main.__module__]  # a package's main: the module that defines it and its parser
    if callable(getattr(m, "parse_args", None)):
        return m.parse_args(argv)
    if hasattr(m, "build_parser"):
        return m.build_parser().parse_args(argv)
    real = argparse.ArgumentParser.parse_args

    def stop_after_parsing(self, args=None, namespace=None):
        raise Parsed(real(self, args, namespace))

    argparse.ArgumentParser.parse_args = stop_after_parsing
    try:
        m.main(argv)
    except Parsed as done:
        return done.args[0]
    finally:
        argparse.ArgumentParser.parse_args = real
    raise AssertionError(f"{module}.main returned without parsing its arguments")


def check_values(module: str, args) -> None:
    """What a module checks after parsing, before it builds anything: its model lists."""
    if module in ("retnet_train.bench.train_throughput", "retnet_train.bench.activation_bytes"):
        from retnet_train.bench.throughput_args import model_specs

        model_specs(args.models, args.preset, args.backend)
    elif module == "retnet_train.bench.quality":
        from retnet_train.bench.quality import parse_model

        for spec in args[1].models:
            parse_model(spec)


COMMANDS = doc_commands()


def test_the_docs_have_commands_to_check():
    modules = {m for _, m, _ in COMMANDS}
    assert {"retnet_train.bench.train_throughput", "retnet_train.bench.quality", "data_prep.tokenize"} <= modules


@pytest.mark.parametrize("where,module,argv", COMMANDS, ids=[f"{w} {m}" for w, m, _ in COMMANDS])
def test_each_command_in_the_docs_parses(where, module, argv):
    for variant in alternatives(argv):
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                args = parse(module, variant)
                check_values(module, args)
        except SystemExit as e:
            pytest.fail(f"{where}: python -m {module} {shlex.join(variant)}\n{err.getvalue() or e}")


class ProgFound(Exception):
    pass


def parser_prog(module: str, argv: list) -> str:
    """The name the module's argument parser gives itself in its usage line and its errors."""
    real = argparse.ArgumentParser.parse_args

    def stop_before_parsing(self, args=None, namespace=None):
        raise ProgFound(self.prog)

    argparse.ArgumentParser.parse_args = stop_before_parsing
    try:
        parse(module, argv)
    except ProgFound as found:
        return found.args[0]
    finally:
        argparse.ArgumentParser.parse_args = real
    raise AssertionError(f"{module} parsed no arguments")


OUR_CLIS = sorted({m: tuple(a) for _, m, a in COMMANDS if m.startswith(("retnet_train.", "data_prep."))}.items())


@pytest.mark.parametrize("module,argv", OUR_CLIS, ids=[m for m, _ in OUR_CLIS])
def test_each_command_names_itself_as_the_docs_run_it(module, argv):
    """`usage: python -m retnet_train.bench.x ...` (data_prep.x), not the file name argparse takes from sys.argv[0]."""
    assert parser_prog(module, alternatives(list(argv))[0]) == f"python -m {module}"


@pytest.mark.parametrize(
    "line,command",
    [
        ("python -m a.sweep x.jsonl --plot x.png   # one plot", ("a.sweep", ["x.jsonl", "--plot", "x.png"])),
        ("torchrun --nproc_per_node=P -m a.cp --steps 1 > o.jsonl", ("a.cp", ["--steps", "1"])),
        (
            "python -m a.x [--stage N] [--mode [a|b]] data.paths=[x]",
            ("a.x", ["--stage", "N", "--mode", "a|b", "data.paths=[x]"]),
        ),
        ("pip install -e .", None),
    ],
)
def test_commands_are_read_from_shell_lines(line, command):
    assert command_in(line) == command


def test_alternatives_and_placeholders():
    assert alternatives(["--mode", "a|b", "N"]) == [["--mode", "a", "2"], ["--mode", "b", "2"]]
    assert alternatives(["--ds-json", '{"a": "x|y"}']) == [["--ds-json", '{"a": "x|y"}']]


def test_a_wrong_option_fails():
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        parse("retnet_train.bench.sweep", ["a.jsonl", "--plots", "x.png"])
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        parse("retnet_train.bench.activation_bytes", ["--activation-memory-budget", "0.5"])  # needs --compile


# ---- launch scripts -------------------------------------------------------------------------

LAUNCH_SCRIPT = re.compile(r"^launch/(?:slurm/)?\w+\.(?:sh|sbatch)$")
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")


def doc_launch_commands() -> list:
    """(where, tokens before the script, script, its arguments) of each launch script command in the docs'
    bash blocks: run as is, after environment assignments, or by sbatch."""
    found = []
    for where, line in doc_bash_lines():
        tokens = shlex.split(line, comments=True)
        at = next((i for i, t in enumerate(tokens) if LAUNCH_SCRIPT.match(t)), None)
        before = tokens[:at] if at is not None else []
        if at is not None and (before[:1] == ["sbatch"] or all(ENV_ASSIGNMENT.match(t) for t in before)):
            found.append((where, before, tokens[at], tokens[at + 1 :]))
    return found


def sbatch_nodes(options: list) -> int:
    """--nodes=N / --nodes N / -N N of an sbatch command line; 1 without."""
    for i, opt in enumerate(options):
        if opt.startswith("--nodes="):
            return int(opt.split("=", 1)[1])
        if opt in ("--nodes", "-N"):
            return int(options[i + 1])
    return 1


def launch_env(before: list) -> dict:
    """The script's environment: the line's own assignments, or under sbatch a fake allocation of its nodes."""
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "USER": "alice"}
    env["PYTHON"] = sys.executable
    if before[:1] == ["sbatch"]:
        n = sbatch_nodes(before[1:])
        nodes = f"node[{1:03d}-{n:03d}]" if n > 1 else "node001"
        env.update(SLURM_JOB_NODELIST=nodes, SLURM_JOB_NUM_NODES=str(n), SLURM_NODEID="0", SLURM_JOB_ID="42")
        env.update(SLURM_GPUS_ON_NODE="8", SLURM_SUBMIT_DIR=str(ROOT))
    else:
        env.update(t.split("=", 1) for t in before)
    return env


LAUNCHES = doc_launch_commands()


def test_the_docs_have_launch_commands_to_check():
    scripts = {script for _, _, script, _ in LAUNCHES}
    assert {
        "launch/torchrun.sh",
        "launch/deepspeed.sh",
        "launch/slurm/nvidia.sbatch",
        "launch/slurm/rocm.sbatch",
    } <= scripts


@pytest.mark.parametrize("where,before,script,args", LAUNCHES, ids=[f"{w} {s}" for w, _, s, _ in LAUNCHES])
def test_each_launch_command_in_the_docs_dry_runs(where, before, script, args, tmp_path):
    args = ["--dry-run", *[a for a in args if a != "--dry-run"]]
    if "--hostfile" in args:  # the docs' hostfile is one they write first: two hosts
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("worker-0 slots=8\nworker-1 slots=8\n")
        args[args.index("--hostfile") + 1] = str(hostfile)
    done = subprocess.run(
        ["bash", str(ROOT / script), *args],
        cwd=ROOT,
        env=launch_env(before),
        capture_output=True,
        text=True,
        timeout=120,
    )
    shown = f"{where}: {script} {shlex.join(args)}\n{done.stdout[-2000:]}{done.stderr}"
    assert done.returncode == 0, shown
    lines = done.stdout.splitlines()
    command = shlex.split(lines[len(lines) - 1 - lines[::-1].index("# command:") + 1])
    passed = command + [w for t in command for w in shlex.split(t)]  # the deepspeed runner's: quoted once more
    for override in (a for a in args if "=" in a and not a.startswith("-")):
        assert override in passed, f"{override!r} not passed through verbatim\n{shown}"


# ---- the trainer's overrides ----------------------------------------------------------------


def trainer_overrides() -> list:
    """(where, Hydra overrides) of each command in the docs' bash blocks that runs the trainer."""
    found = []
    for where, _, _, args in LAUNCHES:
        module = args[args.index("--module") + 1] if "--module" in args else "retnet_train.train"
        if module == "retnet_train.train":
            found.append((where, [a for a in args if "=" in a and not a.startswith("-")]))
    for where, line in doc_bash_lines():
        command = command_in(line)
        if command and command[0] == "retnet_train.train":
            found.append((where, [a for a in command[1] if not a.startswith("-") and a != "job"]))  # --cfg job
    return found


TRAINER_OVERRIDES = trainer_overrides()


def test_the_docs_have_trainer_commands_to_check():
    assert len(TRAINER_OVERRIDES) >= 10 and all(overrides for _, overrides in TRAINER_OVERRIDES)


@pytest.mark.parametrize("where,overrides", TRAINER_OVERRIDES, ids=[w for w, _ in TRAINER_OVERRIDES])
def test_each_trainer_command_in_the_docs_composes(where, overrides):
    """A preset that does not exist (experiment=, model=), a key the schema lacks or a value its checks refuse."""
    from retnet_train.components.config import check_values
    from retnet_train.components.typed_config import typed_config
    from retnet_train.preflight import PreflightError, compose_trainer_config

    try:
        check_values(typed_config(compose_trainer_config(overrides)))
    except (PreflightError, ValueError) as exc:
        pytest.fail(f"{where}: {shlex.join(overrides)}\n{exc}")
