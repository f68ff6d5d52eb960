"""What the launch-script tests share: running a script with a clean environment, running the
"nodes" of one job side by side, a fake SLURM allocation, and reading the sections of a --dry-run's
output."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Overrides that break naive quoting: spaces, quotes, brackets, globs, $, leading +/~.
OVERRIDES = [
    "model=6.7b",
    "experiment=retnet_6.7b_8k",
    "train.name=my run",
    "+data.mix=[0.5,0.5]",
    "~optim.foo",
    "note='it''s'",
    "glob=*",
    "path=$HOME/x",
    'q="a b"',
]


def run(script: str, *args: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    base = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/root"),
        "USER": "alice",
        "PYTHON": sys.executable,
    }
    base.update(env or {})
    return subprocess.run(
        ["bash", str(ROOT / script) if not os.path.isabs(script) else script, *args],
        cwd=cwd,
        env=base,
        capture_output=True,
        text=True,
        timeout=120,
    )


def run_together(commands: list[list[str]], *, cwd: Path, env: dict, timeout: float) -> tuple[list[int], list[str]]:
    """Start every command at once, as the nodes of one job start, and wait for all of them; the
    exit statuses and (stdout + stderr) outputs come back in the commands' order."""
    procs = [
        subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for cmd in commands
    ]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # a node that timed out would otherwise outlive the test
    return [p.returncode for p in procs], outs


def fake_slurm(nodes: str, nnodes: int, **extra: str) -> dict:
    return {
        "SLURM_JOB_NODELIST": nodes,
        "SLURM_JOB_NUM_NODES": str(nnodes),
        "SLURM_NNODES": str(nnodes),
        "SLURM_NODEID": "0",
        "SLURM_JOB_ID": "4242",
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_CPUS_PER_TASK": "64",
        "SLURM_SUBMIT_DIR": str(ROOT),
        **extra,
    }


def command_after(text: str, header: str) -> list[str]:
    lines = text.splitlines()
    return shlex.split(lines[lines.index(header) + 1])


def env_block(section: str) -> dict[str, str]:
    lines = section.splitlines()
    start, end = (
        lines.index("# environment:") + 1,
        next(i for i, line in enumerate(lines) if line in ("# preflight:", "# command:")),
    )
    out = {}
    for line in lines[start:end]:
        k, v = line.removeprefix("export ").split("=", 1)
        (out[k],) = shlex.split(v) or [""]
    return out


def node_sections(text: str) -> list[str]:
    parts = re.split(r"^# ---- node \d+: .*$", text, flags=re.M)
    return parts[1:]
