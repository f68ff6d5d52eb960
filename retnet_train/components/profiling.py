"""torch.profiler over a window of optimizer steps (torchtitan's [profiling]), plus an optional CUDA
memory snapshot over the same window. Writes into <run.dir>/profile/rank<r>/:
  steps<a>-<b>.pt.trace.json      chrome trace (chrome://tracing, ui.perfetto.dev, TensorBoard's plugin)
  steps<a>-<b>.key_averages.txt   top ops by self device time (CUDA) or self CPU time
  steps<a>-<b>.memory_snapshot.pickle   profile.memory_snapshot=true: pytorch.org/memory_viz
"""

from __future__ import annotations

import os
from typing import List, Optional

import torch
from torch.profiler import ProfilerActivity, record_function


def profile_dir(run_dir: str, rank: int) -> str:
    return os.path.join(run_dir, "profile", f"rank{rank}")


def check_profile_ranks(ranks: List[int], world: int) -> None:
    if any(not 0 <= r < world for r in ranks):
        raise ValueError(f"profile.ranks: {list(ranks)} not all within this run's ranks 0-{world - 1}")


class Profiler:
    """`step(n)` once per optimizer step, before step n + 1 starts (n: steps done, so a resumed run
    counts on); `close()` at the end. A no-op when disabled or on a rank not in `ranks`."""

    def __init__(
        self,
        out_dir: str,
        rank: int,
        world: int,
        device_type: str,
        first_step: int,
        *,
        enabled: bool,
        start_step: int,
        steps: int,
        ranks: List[int],
        memory_snapshot: bool,
    ):
        if enabled:
            check_profile_ranks(ranks, world)
        self.out_dir, self.cuda = out_dir, device_type == "cuda"
        self.first, self.last = start_step, start_step + steps - 1
        self.active = enabled and rank in ranks
        self.memory = memory_snapshot and self.active and self.cuda
        if memory_snapshot and self.active and not self.cuda:
            print(f"profile.memory_snapshot: device is {device_type}, not CUDA; memory snapshot skipped", flush=True)
        if self.active and first_step >= self.first:
            print(
                f"profile.start_step={self.first}: this run resumes after step {first_step}; nothing profiled",
                flush=True,
            )
            self.active = False
        self._prof: Optional[torch.profiler.profile] = None
        self._mark = None  # the open "ProfilerStep#<n>" range: per-step markers that trace viewers split on
        self._done = first_step

    def step(self, done: int) -> None:
        if not self.active:
            return
        self._done = done
        if self._mark is not None:
            self._mark.__exit__(None, None, None)
            self._mark = None
        if done + 1 == self.first and self._prof is None:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self._prof = torch.profiler.profile(activities=activities, record_shapes=True)
            if self.memory:
                torch.cuda.memory._record_memory_history(max_entries=200_000)
            self._prof.start()
        if self._prof is None:
            return
        if done >= self.last:
            self.close()
        else:
            # absolute step numbers (not the profiler's own count), so a resumed run labels them right
            self._mark = record_function(f"ProfilerStep#{done + 1}")
            self._mark.__enter__()

    def close(self) -> None:
        """Ends the window early too (end of training, or an error such as an OOM: the memory snapshot
        of the steps up to it is what one wants then)."""
        if self._prof is None:
            return
        if self._mark is not None:
            self._mark.__exit__(None, None, None)
            self._mark = None
        prof, self._prof, self.active = self._prof, None, False
        prof.stop()
        os.makedirs(self.out_dir, exist_ok=True)
        end = min(self._done + 1, self.last)  # the step under way counts; fewer when the run ended early
        base = os.path.join(self.out_dir, f"steps{self.first}-{end}")
        if self.memory:
            torch.cuda.memory._dump_snapshot(base + ".memory_snapshot.pickle")
            torch.cuda.memory._record_memory_history(enabled=None)
        prof.export_chrome_trace(base + ".pt.trace.json")
        sort = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        with open(base + ".key_averages.txt", "w") as f:
            f.write(prof.key_averages().table(sort_by=sort, row_limit=40) + "\n")
        print(f"profile: {base}.* written", flush=True)
