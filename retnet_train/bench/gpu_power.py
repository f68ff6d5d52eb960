"""The GPU's power draw and SM clock while the timed steps run, sampled by `nvidia-smi` in the background.

A step that holds the GPU at its power limit is bound by energy, not by kernel time: the driver lowers
the clocks until the draw fits, and kernel time saved in light (memory-bound) kernels buys little wall
time. These fields tell which regime a row was measured in, and its energy per token.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Optional

import torch

QUERY = "power.draw,enforced.power.limit,clocks.sm,clocks.max.sm,clocks_event_reasons.sw_power_cap"


def parse_samples(text: str) -> list:
    """nvidia-smi's `--format=csv,noheader,nounits` lines of QUERY -> [(watts, limit W, SM MHz, max SM MHz,
    power-capped)], lines it could not read (the first may be cut, [N/A] fields) left out."""
    samples = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 5:
            continue
        try:
            numbers = [float(f) for f in fields[:4]]
        except ValueError:
            continue
        samples.append((*numbers, fields[4] == "Active"))
    return samples


def summarize(samples: list, tokens_per_s: float, min_watts: float = 0.0) -> Optional[dict]:
    """Means over the samples that drew at least min_watts (the GPU at work, not between steps), the share
    of them with the power cap holding the clocks down, and the energy per token at the mean draw."""
    busy = [s for s in samples if s[0] >= min_watts]
    if not busy:
        return None
    mean = [sum(s[i] for s in busy) / len(busy) for i in range(4)]
    return {
        "mean_w": round(mean[0], 1),
        "power_limit_w": round(mean[1], 1),
        "mean_sm_mhz": round(mean[2]),
        "max_sm_mhz": round(mean[3]),
        "power_capped_share": round(sum(s[4] for s in busy) / len(busy), 3),
        "joules_per_token": round(mean[0] / tokens_per_s, 5),
        "samples": len(busy),
    }


def smi_id(device: torch.device) -> str:
    """The GPU as nvidia-smi names it: by UUID (CUDA_VISIBLE_DEVICES may renumber the devices)."""
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    if uuid is None:
        return str(device.index if device.index is not None else torch.cuda.current_device())
    return str(uuid) if str(uuid).startswith("GPU-") else f"GPU-{uuid}"


class PowerSampler:
    """A context manager: nvidia-smi samples every interval_ms while it is open; `samples` after it
    closes (empty where there is no nvidia-smi: ROCm, CPU)."""

    def __init__(self, device: torch.device, interval_ms: int = 200, command: str = "nvidia-smi"):
        self.command = shutil.which(command) if device.type == "cuda" else None
        self.args = [] if self.command is None else self._args(device, interval_ms)
        self.process, self.samples = None, []

    def _args(self, device, interval_ms):
        return [
            f"--id={smi_id(device)}",
            f"--query-gpu={QUERY}",
            "--format=csv,noheader,nounits",
            f"--loop-ms={interval_ms}",
        ]

    def __enter__(self):
        if self.command is not None:
            self.process = subprocess.Popen(
                [self.command, *self.args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
            )
        return self

    def __exit__(self, *exc):
        if self.process is not None:
            self.process.terminate()
            out, _ = self.process.communicate(timeout=10)
            self.samples = parse_samples(out)
        return False
