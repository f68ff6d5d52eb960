"""This node's software and hardware: python/torch/CUDA or ROCm/NCCL or RCCL/DeepSpeed versions,
the torch build's vendor, the visible GPUs (count against --nproc-per-node, bf16 support) and
whether fla's retention kernels import. These are the checks that fail after the queue wait when
a node has the wrong wheel or driver, so they run first and each names the fix."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import socket
import sys

from .report import Report


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_versions(rep: Report) -> None:
    import torch

    rep.ok(f"python {sys.version.split()[0]}, torch {torch.__version__} on {socket.gethostname()}")
    if torch.version.hip:
        rep.ok(f"ROCm/HIP {torch.version.hip}")
    elif torch.version.cuda:
        rep.ok(f"CUDA {torch.version.cuda}")
    else:
        rep.ok("CPU-only torch build (no CUDA, no ROCm)")
    import torch.distributed as dist

    if dist.is_available() and dist.is_nccl_available():
        name = "RCCL" if torch.version.hip else "NCCL"
        try:
            ver = torch.cuda.nccl.version()
            ver = ".".join(map(str, ver)) if isinstance(ver, tuple) else str(ver)
            rep.ok(f"{name} {ver}")
        except Exception as exc:  # noqa: BLE001 - report whatever the library raises
            rep.fail(f"{name} is built in but its version cannot be read: {exc}")
    else:
        rep.ok("NCCL/RCCL: not in this torch build (gloo backend only)")
    ds = _dist_version("deepspeed")
    if ds is None:
        rep.fail("deepspeed is not installed (pip install 'deepspeed>=0.15')")
    else:
        try:
            importlib.import_module("deepspeed")
            rep.ok(f"deepspeed {ds}")
        except Exception as exc:  # noqa: BLE001 - a broken install raises anything
            rep.fail(f"deepspeed {ds} is installed but fails to import: {type(exc).__name__}: {exc}")


def check_vendor(rep: Report, vendor: str) -> None:
    import torch

    build = "rocm" if torch.version.hip else "cuda" if torch.version.cuda else "cpu"
    if build == vendor:
        return
    how = (
        "pip install --index-url https://download.pytorch.org/whl/rocmX.Y torch"
        if vendor == "rocm"
        else "pip install torch (a CUDA wheel)"
    )
    rep.fail(
        f"this launch is for {'AMD ROCm' if vendor == 'rocm' else 'NVIDIA CUDA'} GPUs but torch "
        f"{torch.__version__} is a {build.upper() if build != 'cpu' else 'CPU-only'} build: {how}"
    )


def check_gpus(
    rep: Report,
    *,
    nproc_per_node: int | None,
    require_bf16: bool,
    required_by: str | None = None,
) -> None:
    """required_by: what makes a GPU necessary (the option or a config key), for the failure; None: a run
    without one trains on CPU."""
    import torch

    vis = {
        k: os.environ[k]
        for k in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")
        if k in os.environ
    }
    vis_txt = f" ({', '.join(f'{k}={v}' for k, v in vis.items())})" if vis else ""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        why = "CPU-only torch build" if not (torch.version.cuda or torch.version.hip) else "no device visible"
        msg = f"no GPU: {why}{vis_txt}"
        if required_by:
            rep.fail(f"{msg} and {required_by}")
        else:
            rep.ok(msg + "; training would run on CPU with gloo")
        return
    names = sorted({torch.cuda.get_device_name(i) for i in range(n)})
    rep.ok(f"{n} GPU(s){vis_txt}: {', '.join(names)}")
    if nproc_per_node is not None and nproc_per_node > n:
        rep.fail(f"--nproc-per-node={nproc_per_node} but only {n} GPU(s) are visible{vis_txt}")
    if torch.version.hip and vis.get("HIP_VISIBLE_DEVICES") and vis.get("ROCR_VISIBLE_DEVICES"):
        rep.warn(
            "both ROCR_VISIBLE_DEVICES and HIP_VISIBLE_DEVICES are set: HIP indexes into the devices ROCR "
            "leaves visible, so the two compound; keep only ROCR_VISIBLE_DEVICES (SLURM sets it)"
        )
    # native bf16 only: torch's default counts emulation, under which every CUDA GPU passes, pre-Ampere
    # ones (V100, T4) too, where bf16 is emulated
    if torch.cuda.is_bf16_supported(including_emulation=False):
        rep.ok("bf16 supported")
    elif require_bf16:
        rep.fail(
            "bf16 is not supported on this GPU (pre-Ampere NVIDIA / pre-MI200 AMD); "
            "pass --no-bf16-check if your config trains in fp16/fp32"
        )
    else:
        rep.warn("bf16 is not supported on this GPU")


def check_fla(rep: Report, *, require_fla: bool) -> None:
    import torch

    extra = "fla-core[rocm]" if torch.version.hip else "retnet-train[gpu] (fla-core)"
    if importlib.util.find_spec("fla") is None:
        if torch.version.hip:
            msg = f"fla not installed: retention_backend=auto uses the torch kernels on ROCm (slower); install {extra}"
        else:  # on NVIDIA, auto takes this repository's Triton kernels: fla is only for retention_backend=fla
            msg = f"fla not installed (needed only for retention_backend=fla): install {extra}"
        warn = torch.cuda.is_available() and torch.version.hip
        (rep.fail if require_fla else rep.warn if warn else rep.ok)(msg)
        return
    ver = _dist_version("fla-core") or _dist_version("flash-linear-attention") or "unknown version"
    try:
        importlib.import_module("fla.ops.retention")
        rep.ok(f"fla {ver} (fla.ops.retention imports)")
    except Exception as exc:  # noqa: BLE001 - triton/driver mismatches raise anything
        (rep.fail if require_fla else rep.warn)(
            f"fla {ver} is installed but fla.ops.retention fails to import: {type(exc).__name__}: {exc}"
        )
