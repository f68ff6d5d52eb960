"""An entry point's exit status survives Gloo's worker threads: a thread still releasing the tensors of
the last collective when the interpreter tears down aborts the process (-6) instead of its status."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# an entry point's end: a group kept referenced past destroy_process_group (as DeepSpeed keeps it), whose
# worker thread holds the last reference to a collective's tensor when exit_with() ends the process; an exit handler
# registered after end_before_teardown (as torch's are) still runs
EXIT_AFTER_A_COLLECTIVE = """
from retnet_train.components.process_exit import end_before_teardown, exit_with
end_before_teardown()
import atexit
import torch
import torch.distributed as dist
atexit.register(print, "a later exit handler ran")
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
kept = dist.group.WORLD
dist.all_reduce(torch.ones(1000), async_op=True)
dist.destroy_process_group()
exit_with(75)
"""


def test_exit_with_ends_with_its_status_while_a_gloo_thread_releases_a_collective():
    for _ in range(3):  # without end_before_teardown nearly every run aborts
        proc = subprocess.run(
            [sys.executable, "-c", EXIT_AFTER_A_COLLECTIVE],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 75, proc.stderr[-2000:]
        assert "terminate called" not in proc.stderr
        assert proc.stdout == "a later exit handler ran\n"
