"""What the preflight tests share: running `python -m retnet_train.preflight` as a node would, and
the parameter count of the tiny preset that their expected disk lines quote."""

from __future__ import annotations

import os
import subprocess
import sys

from launch_helpers import ROOT

from retnet_train import preflight as pf

TINY_PRESET = ROOT / "configs/model/tiny.yaml"


def preflight_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "retnet_train.preflight", *args]


def preflight_env(env: dict | None = None, unset: tuple[str, ...] = ()) -> dict:
    inherited = {k: v for k, v in os.environ.items() if k not in unset}
    return {**inherited, "PYTHONPATH": str(ROOT), **(env or {})}


def cli(
    *args: str, env: dict | None = None, unset: tuple[str, ...] = (), timeout: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(
        preflight_command(*args),
        cwd=ROOT,
        env=preflight_env(env, unset),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tiny_params() -> int:
    return pf.params_from_preset(TINY_PRESET)
