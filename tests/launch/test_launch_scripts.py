"""Every launch script: --help, strict bash, shellcheck. (Each script's own behaviour:
test_torchrun_script.py, test_deepspeed_script.py, test_sbatch_scripts.py.)"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from launch_helpers import ROOT, fake_slurm, run

SCRIPTS = [
    "launch/torchrun.sh",
    "launch/deepspeed.sh",
    "launch/common.sh",
    "launch/signals.sh",
    "launch/slurm/nvidia.sbatch",
    "launch/slurm/rocm.sbatch",
    "launch/slurm/common.sh",
]


SOURCED = ("launch/common.sh", "launch/signals.sh", "launch/slurm/common.sh")


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s not in SOURCED])
def test_help(script):
    r = run(script, "--help", env=fake_slurm("n1", 1))
    assert r.returncode == 0, r.stderr
    assert "--dry-run" in r.stdout and "--checkpoint-dir" in r.stdout


def test_scripts_are_strict_bash():
    for s in SCRIPTS:
        text = (ROOT / s).read_text()
        if s not in SOURCED:
            assert text.startswith("#!/usr/bin/env bash\n"), s
            assert "\nset -euo pipefail\n" in text, s
            assert os.access(ROOT / s, os.X_OK), f"{s} is not executable"


def test_every_script_under_launch_is_linted():
    """shellcheck -x follows `source` but reports only the files it is given: a sourced file left out
    of SCRIPTS is never checked."""
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "launch").rglob("*") if p.suffix in (".sh", ".sbatch")}
    assert on_disk == set(SCRIPTS)


def test_shellcheck_clean():
    exe = shutil.which("shellcheck")
    if exe is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("shellcheck is not installed but CI=true: CI must install it (apt-get install -y shellcheck)")
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck); CI=true makes this a failure")
    r = subprocess.run([exe, "-x", "--severity=style", *SCRIPTS], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
