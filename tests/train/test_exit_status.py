"""The trainer's exit status survives Gloo's worker threads: a thread still releasing the tensors of the
last collective when the interpreter tears down used to abort the process (-6) instead of its status."""

from __future__ import annotations

import subprocess
import sys

from trainer_helpers import REPO, env

# the trainer's exit: a group kept referenced past destroy_process_group (as DeepSpeed keeps it), whose
# worker thread holds the last reference to a collective's tensor when finish() ends the process
EXIT_AFTER_A_COLLECTIVE = """
from retnet_train.train import end_before_teardown, finish
end_before_teardown()
import torch
import torch.distributed as dist
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
kept = dist.group.WORLD
dist.all_reduce(torch.ones(1000), async_op=True)
dist.destroy_process_group()
finish(75)
"""


def test_finish_ends_with_its_status_while_a_gloo_thread_releases_a_collective():
    for _ in range(3):  # without end_before_teardown nearly every run aborts
        proc = subprocess.run(
            [sys.executable, "-c", EXIT_AFTER_A_COLLECTIVE],
            cwd=REPO,
            env={**env(), "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 75, proc.stderr[-2000:]
        assert "terminate called" not in proc.stderr
