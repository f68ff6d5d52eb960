"""Every Triton retention kernel compiles for an NVIDIA H100/H200 (sm_90) and an AMD MI300 (gfx942)
target, checked on CPU: the launches of a bf16 forward + backward are captured and compiled
(triton_compile.py, in a fresh process)."""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS = {"_states_kernel", "_states_carry_kernel", "_scores_kernel", "_apply_kernel", "_states_pair_kernel"}

pytest.importorskip("triton")


@pytest.mark.parametrize("target", ["cuda:90", "hip:gfx942"])
def test_kernels_compile_for_target(target, tmp_path):
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "cache"))  # (compiled here, not read from a cache)
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run(
        [sys.executable, os.path.join(HERE, "triton_compile.py"), target],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])[target]
    assert {key.split("[")[0] for key in results} == KERNELS
    failed = {key: err for key, err in results.items() if err is not None}
    assert not failed, "\n\n".join(f"{key}\n{err}" for key, err in failed.items())
