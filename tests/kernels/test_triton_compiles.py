"""Every Triton retention kernel compiles for an NVIDIA H100/H200 (sm_90) and an AMD MI300 (gfx942)
target, checked on CPU: the launches of a bf16 forward + backward are captured and compiled
(triton_compile.py, in a fresh process); and to the same code whatever Triton's default for fused
multiply-adds (off from Triton 3.10)."""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS = {"_states_kernel", "_states_carry_kernel", "_scores_kernel", "_apply_kernel", "_states_pair_kernel"}

pytest.importorskip("triton")


def compile_script(args: list, cache, **env_vars) -> dict:
    """triton_compile.py's JSON for args, compiled into the Triton cache directory `cache`."""
    env = dict(os.environ, TRITON_CACHE_DIR=str(cache), **env_vars)
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run(
        [sys.executable, os.path.join(HERE, "triton_compile.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    """{"compiled": errors, "digest": digests} of both targets with Triton's default fused multiply-adds on (its
    default up to Triton 3.9): one process and one compilation of each launch serve both tests below."""
    return compile_script(
        ["--both", "cuda:90", "hip:gfx942"], tmp_path_factory.mktemp("cache"), TRITON_DEFAULT_FP_FUSION="1"
    )


@pytest.mark.parametrize("target", ["cuda:90", "hip:gfx942"])
def test_kernels_compile_for_target(target, fused):
    results = fused["compiled"][target]  # (compiled in a fresh cache, not read from one)
    assert {key.split("[")[0] for key in results} == KERNELS
    failed = {key: err for key, err in results.items() if err is not None}
    assert not failed, "\n\n".join(f"{key}\n{err}" for key, err in failed.items())


def test_the_generated_code_does_not_depend_on_tritons_fp_fusion_default(fused, tmp_path):
    unfused = compile_script(["--digest", "cuda:90"], tmp_path / "cache", TRITON_DEFAULT_FP_FUSION="0")["cuda:90"]
    fused = fused["digest"]["cuda:90"]
    assert set(fused) == set(unfused) and {key.split("[")[0] for key in fused} == KERNELS
    assert fused == unfused  # the launches ask for fused multiply-adds themselves
