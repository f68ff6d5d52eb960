"""Two CPU ranks (gloo) under torchrun running the trainer's command line through a wrapper script that
makes one rank fail (failing_save.py, failing_start.py): the launch, and each rank's stderr in its own
file (two ranks printing at once to one pipe can interleave their lines)."""

import os
import runpy
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# trainer_helpers (the tests' shards and overrides, the launch's environment) lives in tests/train
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
LOGS = "RANK_FAULT_LOGS"  # where each rank's stderr goes: <dir>/rank<R>.stderr
# what rank 1 prints where rank 0 prints the error they share
POINTER = "error: rank 1: the same error as rank 0, which prints it"


def run_trainer() -> None:
    """A wrapper's main, after it installed its fault: the trainer, this rank's stderr to its own file."""
    path = os.path.join(os.environ[LOGS], f"rank{os.environ.get('RANK', 0)}.stderr")
    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
    runpy.run_module("retnet_train.train", run_name="__main__", alter_sys=True)


@dataclass
class Launch:
    proc: subprocess.CompletedProcess
    seconds: float
    ranks: list  # each rank's stderr

    @property
    def errors(self) -> list:
        """Each rank's 'error: ' lines."""
        return [[line for line in text.splitlines() if line.startswith("error: ")] for text in self.ranks]

    @property
    def output(self) -> str:
        """Everything printed, for an assertion's message."""
        ranks = "".join(f"--- rank {rank}:\n{text}" for rank, text in enumerate(self.ranks))
        return ranks + self.proc.stdout + self.proc.stderr


def launch_two_ranks(wrapper: Path, args: list, fault_env: dict, logs: Path, timeout: int) -> Launch:
    from trainer_helpers import REPO, env  # (not in the wrappers' processes: it imports pytest)

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    began = time.monotonic()
    proc = subprocess.run(
        [*torchrun, str(wrapper), *args],
        cwd=REPO,
        # (the wrapper's own directory comes first on its sys.path: this checkout's package next)
        env={**env(), **fault_env, LOGS: str(logs), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    seconds = time.monotonic() - began
    return Launch(proc, seconds, [(logs / f"rank{rank}.stderr").read_text() for rank in (0, 1)])
