"""Rank-0 logging: a console line and metrics.jsonl per log step, and W&B in the chosen mode."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
import uuid
from contextlib import contextmanager
from typing import Callable, NamedTuple, Optional

import torch
from tqdm import tqdm


class DeviceFigures(NamedTuple):
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bandwidth: float  # bytes/s


# Per torch device, by the first key in its name: the PCIe, NVL and 40GB boards come before the others of
# the same name (lower clocks and power, or less and slower HBM). An MI250X package is two GCDs, each of
# which torch sees as a device (launch/README.md): one GCD has half the package's 383e12 and 3.2e12.
DEVICE_FIGURES = {
    "H100 PCIe": DeviceFigures(756e12, 2.0e12),
    "H100 NVL": DeviceFigures(835e12, 3.9e12),
    "H200 NVL": DeviceFigures(835e12, 4.8e12),
    "H100": DeviceFigures(989e12, 3.35e12),
    "H200": DeviceFigures(989e12, 4.8e12),
    "A100-SXM4-40GB": DeviceFigures(312e12, 1.555e12),
    "A100-PCIE-40GB": DeviceFigures(312e12, 1.555e12),
    "A100": DeviceFigures(312e12, 2.0e12),
    "MI250X": DeviceFigures(191.5e12, 1.6e12),
    "MI300X": DeviceFigures(1307e12, 5.3e12),
}


def device_figures(name: str) -> Optional[DeviceFigures]:
    """The figures of the torch device named `name`; None for a device not in the table, and for a MIG
    slice ("... MIG 3g.40gb"), whose share of the board's figures the name does not tell."""
    if "MIG" in name:
        return None
    return next((v for k, v in DEVICE_FIGURES.items() if k in name), None)


def device_peak_flops(device: torch.device, override: Optional[float]) -> Optional[float]:
    """train.peak_flops if set, else the device's dense bf16 peak (None where not known)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    figures = device_figures(torch.cuda.get_device_name(device))
    return figures.peak_flops if figures else None


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: Optional[float], world: int) -> Optional[float]:
    """Model FLOPs utilization over all `world` devices; None where the device's peak is not known."""
    return tokens_per_s * flops_per_token / (peak_flops * world) if peak_flops else None


def progress_bar(max_steps: int, done: int, is_main: bool) -> tqdm:
    """Rank 0's bar of optimizer steps, shown on a terminal only."""
    return tqdm(total=max_steps, initial=done, unit="step", dynamic_ncols=True, disable=True if not is_main else None)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Throughput:
    """Tokens per second of training between two logs. Time inside `paused()` (evaluation,
    checkpoint saves, the profiler's export) is left out, so the interval that holds one shows the
    training speed instead of a dip."""

    def __init__(self, tokens_seen: int, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.t_last, self.tokens_last, self.paused_s = clock(), tokens_seen, 0.0

    @contextmanager
    def paused(self):
        start = self.clock()
        try:
            yield
        finally:
            self.paused_s += self.clock() - start

    def rate(self, tokens_seen: int) -> float:
        """Tokens/s since the last call (or the start), then a new interval begins."""
        now = self.clock()
        tps = (tokens_seen - self.tokens_last) / max(now - self.t_last - self.paused_s, 1e-9)
        self.t_last, self.tokens_last, self.paused_s = now, tokens_seen, 0.0
        return tps


class MetricsLogger:
    def __init__(self, run_dir: str, is_main: bool, wandb_cfg, resolved_config: dict, wandb_id: Optional[str]):
        self.is_main = is_main
        self.wandb_id = wandb_id or uuid.uuid4().hex[:12]
        self.path = os.path.join(run_dir, "metrics.jsonl")
        # a run killed while writing a record leaves it without its newline: the next starts a line
        self._line_break = "\n" if is_main and _ends_mid_line(self.path) else ""
        self._wandb = None
        if is_main and wandb_cfg.mode != "disabled":
            self._wandb = self._start_wandb(run_dir, wandb_cfg, resolved_config)

    def _start_wandb(self, run_dir: str, wandb_cfg, resolved_config: dict):
        """W&B's run, or None when it cannot start (no API key, no network, unknown entity or project):
        as a failure later, one warning and the run trains without W&B (a requeued job whose start finds
        W&B unreachable trains on rather than ending with an error); wandb.required=true stops it instead."""
        import wandb  # imported only when used

        try:
            run = wandb.init(
                project=wandb_cfg.project,
                entity=wandb_cfg.entity,
                name=wandb_cfg.name,
                tags=list(wandb_cfg.tags),
                mode=wandb_cfg.mode,
                id=self.wandb_id,
                resume="allow",
                dir=run_dir,
                config=resolved_config,
            )
            # charts against the trainer's step, not W&B's own counter: W&B drops a record logged at a
            # step below its counter, and a run resumed after a crash logs again the steps after its checkpoint
            run.define_metric("step")
            run.define_metric("*", step_metric="step")
            return run
        except Exception as e:
            if wandb_cfg.required:
                raise ValueError(
                    f"wandb.mode={wandb_cfg.mode}: {(str(e).strip() or type(e).__name__).splitlines()[0]} "
                    f"(wandb.mode=offline logs under {run_dir}/wandb for a later `wandb sync`; "
                    f"wandb.required=false trains without W&B)"
                ) from None
            _teardown_wandb()
            self._warn(
                f"W&B could not start (wandb.mode={wandb_cfg.mode}: {_brief(e)}): this run trains without W&B "
                f"(wandb.required=true stops it instead)"
            )
            return None

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        stored = {k: _finite_or_none(v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(self._line_break + json.dumps(stored) + "\n")
        self._line_break = ""
        # the console shows a non-finite value as it is (inf, nan); None is left out
        parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items() if v is not None]
        self.write(" | ".join(parts))
        self._log_to_wandb(stored)

    def _log_to_wandb(self, record: dict) -> None:
        """W&B holds a copy of metrics.jsonl: its failure (the service gone, a full disk) must not stop a
        run, whose steps since the last checkpoint would be lost, so it is said once and W&B left alone."""
        if self._wandb is None:
            return
        try:
            self._wandb.log({k: v for k, v in record.items() if v is not None})
        except Exception as e:
            self._wandb = None
            _teardown_wandb()
            self._warn(
                f"W&B logging failed at step {record.get('step')} ({_brief(e)}): W&B is off for the rest of this run"
            )

    @staticmethod
    def write(line: str) -> None:
        """A console line that does not break rank 0's progress bar."""
        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()

    def _warn(self, what: str) -> None:
        tqdm.write(f"warning: {what}; metrics.jsonl keeps every record ({self.path})", file=sys.stderr)
        sys.stderr.flush()

    def close(self, failed: bool = False) -> None:
        """failed: the run stops with an error; W&B shows its run as failed rather than finished."""
        run, self._wandb = self._wandb, None
        if run is None:
            return
        try:
            run.finish(exit_code=1 if failed else 0)
        except Exception as e:  # the run's checkpoints and metrics.jsonl are written already
            _teardown_wandb()
            self._warn(f"W&B could not finish its run ({_brief(e)})")


def _ends_mid_line(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except FileNotFoundError:
        return False


def _finite_or_none(value):
    """JSON has no inf or nan (json.dumps would write Infinity / NaN, which strict readers refuse): a
    non-finite float is null, as a skipped step's non-finite loss is."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _teardown_wandb() -> None:
    """Let go of a failed W&B service now, so that its own exit hook does not print a second traceback."""
    try:
        sys.modules["wandb"].teardown()
    except Exception:
        pass  # a service already gone fails to answer the teardown; the hook is unregistered first


def _brief(error: Exception) -> str:
    """'Type: first line of the message', for a one-line warning."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
