"""Preflight: fail in seconds, not after the queue wait, when a node cannot train.

    python -m retnet_train.preflight --checkpoint-dir /shared/ckpt --params 1.3e9 --nproc-per-node 8
    python -m retnet_train.preflight --checkpoint-dir /shared/ckpt -- model=6.7b experiment=...
    torchrun --nproc_per_node=2 -m retnet_train.preflight --dist-check    # all_reduce across ranks

Reports torch, CUDA or ROCm, NCCL/RCCL and DeepSpeed versions, GPU count and bf16 support,
fla availability; checks that the checkpoint directory is writable, shared by all nodes and has
room for the checkpoints. Exit status 1 when a check fails, 2 on bad arguments. Without a GPU it
reports "no GPU" and passes unless --require-gpu.

Checkpoint size: 16 bytes per parameter (bf16 weights 2 + fp32 master weights 4 + Adam's two
fp32 moments 8, rounded up for metadata and the data loader state), times --keep-checkpoints
(default 2: a new checkpoint is written before the previous one is removed). The parameter
count comes from --params, else --model-preset FILE, else a `model=NAME` Hydra override
(configs/model/NAME.yaml), counted exactly by building the model on the meta device.

Shared directory (--nnodes > 1): every node runs the preflight at the same time with the same
--shared-id. Node 0 writes <dir>/.preflight/<id>.marker holding a random nonce; every other node
waits for it, then writes <id>.ack-<rank> with that nonce; node 0 waits for all acks and writes
<id>.done; the others wait for it and delete their acks; node 0 removes the marker and done file.
A node-local directory (/tmp, local NVMe) fails on both sides within --shared-timeout seconds.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import secrets
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .preflight_config import (
    REPO_ROOT, PreflightError, compose_trainer_config, hydra_overrides, override_value, params_from_preset,
    parse_params, trainer_view,
)

BYTES_PER_PARAM = 16


@dataclass
class Report:
    lines: list[tuple[str, str]] = field(default_factory=list)

    def ok(self, msg: str) -> None:
        self._add("ok", msg)

    def warn(self, msg: str) -> None:
        self._add("warn", msg)

    def fail(self, msg: str) -> None:
        self._add("FAIL", msg)

    def _add(self, level: str, msg: str) -> None:
        self.lines.append((level, msg))
        print(f"[{level:>4}] {msg}", flush=True)

    @property
    def failures(self) -> list[str]:
        return [m for lvl, m in self.lines if lvl == "FAIL"]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------- parameter count


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
    how = ("pip install --index-url https://download.pytorch.org/whl/rocmX.Y torch" if vendor == "rocm"
           else "pip install torch (a CUDA wheel)")
    rep.fail(f"this launch is for {'AMD ROCm' if vendor == 'rocm' else 'NVIDIA CUDA'} GPUs but torch "
             f"{torch.__version__} is a {build.upper() if build != 'cpu' else 'CPU-only'} build: {how}")


def check_gpus(rep: Report, *, nproc_per_node: int | None, require_gpu: bool, require_bf16: bool) -> None:
    import torch

    vis = {k: os.environ[k] for k in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")
           if k in os.environ}
    vis_txt = f" ({', '.join(f'{k}={v}' for k, v in vis.items())})" if vis else ""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        msg = f"no GPU: {'CPU-only torch build' if not (torch.version.cuda or torch.version.hip) else 'no device visible'}{vis_txt}"
        if require_gpu:
            rep.fail(msg + " and --require-gpu was given")
        else:
            rep.ok(msg + "; training would run on CPU with gloo")
        return
    names = sorted({torch.cuda.get_device_name(i) for i in range(n)})
    rep.ok(f"{n} GPU(s){vis_txt}: {', '.join(names)}")
    if nproc_per_node is not None and nproc_per_node > n:
        rep.fail(f"--nproc-per-node={nproc_per_node} but only {n} GPU(s) are visible{vis_txt}")
    if torch.version.hip and vis.get("HIP_VISIBLE_DEVICES") and vis.get("ROCR_VISIBLE_DEVICES"):
        rep.warn("both ROCR_VISIBLE_DEVICES and HIP_VISIBLE_DEVICES are set: HIP indexes into the devices ROCR "
                 "leaves visible, so the two compound; keep only ROCR_VISIBLE_DEVICES (SLURM sets it)")
    if torch.cuda.is_bf16_supported():
        rep.ok("bf16 supported")
    elif require_bf16:
        rep.fail("bf16 is not supported on this GPU (pre-Ampere NVIDIA / pre-MI200 AMD); "
                 "pass --no-bf16-check if your config trains in fp16/fp32")
    else:
        rep.warn("bf16 is not supported on this GPU")


def check_fla(rep: Report, *, require_fla: bool) -> None:
    import torch

    extra = "fla-core[rocm]" if torch.version.hip else "retnet-train[gpu] (fla-core)"
    if importlib.util.find_spec("fla") is None:
        msg = f"fla not installed: retention_backend=auto uses the torch kernels (slower on GPU); install {extra}"
        (rep.fail if require_fla else rep.ok if not torch.cuda.is_available() else rep.warn)(msg)
        return
    ver = _dist_version("fla-core") or _dist_version("flash-linear-attention") or "unknown version"
    try:
        importlib.import_module("fla.ops.retention")
        rep.ok(f"fla {ver} (fla.ops.retention imports)")
    except Exception as exc:  # noqa: BLE001 - triton/driver mismatches raise anything
        (rep.fail if require_fla else rep.warn)(f"fla {ver} is installed but fla.ops.retention fails to import: "
                                                f"{type(exc).__name__}: {exc}")


def check_writable(rep: Report, ckpt: Path) -> bool:
    try:
        ckpt.mkdir(parents=True, exist_ok=True)
        probe = ckpt / f".preflight-write-{socket.gethostname()}-{os.getpid()}"
        data = secrets.token_bytes(4096)
        with open(probe, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        ok = probe.read_bytes() == data
        probe.unlink()
    except OSError as exc:
        rep.fail(f"checkpoint dir {ckpt} is not writable: {exc.strerror or exc} "
                 f"({errno.errorcode.get(exc.errno, exc.errno)})")
        return False
    if not ok:
        rep.fail(f"checkpoint dir {ckpt}: a file written there reads back different")
        return False
    rep.ok(f"checkpoint dir {ckpt} is writable")
    return True


def check_disk(rep: Report, ckpt: Path, params: int | None, keep: int, source: str) -> None:
    if params is None:
        rep.warn("free-space check skipped: no --params, --model-preset or model=... override")
        return
    need = params * BYTES_PER_PARAM * keep
    free = shutil.disk_usage(ckpt).free
    count = f"{params / 1e9:.3g}B" if params >= 1e9 else f"{params / 1e6:.3g}M"
    what = (f"{count} params ({source}) x {BYTES_PER_PARAM} B/param x {keep} checkpoint(s) "
            f"= {human_bytes(need)}; free on {ckpt}: {human_bytes(free)}")
    if free < need:
        rep.fail("not enough disk for checkpoints: " + what)
    else:
        rep.ok("disk: " + what)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, IsADirectoryError):
        return None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _wait(pred: Callable[[], bool], timeout: float, poll: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)


def check_shared(rep: Report, ckpt: Path, *, shared_id: str, node_rank: int, nnodes: int, timeout: float) -> None:
    """Marker handshake through the checkpoint dir (see the module docstring)."""
    if nnodes == 1:
        rep.ok("checkpoint dir sharing: single node, not needed")
        return
    d = ckpt / ".preflight"
    d.mkdir(parents=True, exist_ok=True)
    marker, done = d / f"{shared_id}.marker", d / f"{shared_id}.done"
    ack = lambda r: d / f"{shared_id}.ack-{r}"  # noqa: E731
    hint = ("is it node-local storage (/tmp, local NVMe, a per-node mount)? "
            "Checkpoints must be on a filesystem all nodes mount")
    if node_rank == 0:
        for stale in [marker, done, *(ack(r) for r in range(1, nnodes))]:
            stale.unlink(missing_ok=True)
        nonce = secrets.token_hex(8)
        _write_atomic(marker, json.dumps({"nonce": nonce, "host": socket.gethostname()}))
        have = lambda: [r for r in range(1, nnodes) if (_read(ack(r)) or "").strip() == nonce]  # noqa: E731
        if not _wait(lambda: len(have()) == nnodes - 1, timeout):
            missing = sorted(set(range(1, nnodes)) - set(have()))
            rep.fail(f"checkpoint dir {ckpt} is not shared: node(s) {missing} did not acknowledge node 0's marker "
                     f"{marker} within {timeout:g}s; {hint} (or did those nodes not start the preflight?)")
            marker.unlink(missing_ok=True)
            return
        _write_atomic(done, nonce)
        # The others delete their acks once they have seen `done`; then nothing is left behind.
        _wait(lambda: not any(ack(r).exists() for r in range(1, nnodes)), timeout)
        marker.unlink(missing_ok=True)
        done.unlink(missing_ok=True)
        try:
            d.rmdir()  # only when empty: another launch may be using it
        except OSError:
            pass
        rep.ok(f"checkpoint dir {ckpt} is shared by all {nnodes} nodes")
        return
    acked = {"nonce": None}

    def step() -> bool:
        text = _read(marker)
        if text:
            try:
                nonce = json.loads(text)["nonce"]
            except (ValueError, KeyError, TypeError):
                nonce = None
            if nonce and nonce != acked["nonce"]:
                _write_atomic(ack(node_rank), nonce)
                acked["nonce"] = nonce
        return acked["nonce"] is not None and (_read(done) or "").strip() == acked["nonce"]

    if not _wait(step, timeout):
        seen = "saw node 0's marker but not its completion" if acked["nonce"] else f"node 0's marker {marker} never appeared"
        rep.fail(f"checkpoint dir {ckpt} is not shared (node {node_rank}): {seen} within {timeout:g}s; {hint}")
        return
    ack(node_rank).unlink(missing_ok=True)
    rep.ok(f"checkpoint dir {ckpt} is shared with node 0")


# ---------------------------------------------------------------- distributed check


def dist_check(timeout_s: float = 120.0) -> int:
    """all_reduce and all_gather across the ranks torchrun started; rank 0 prints the result."""
    import datetime

    import torch
    import torch.distributed as dist

    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            print(f"preflight --dist-check: {var} is unset: run under torchrun or launch/torchrun.sh", file=sys.stderr)
            return 2
    use_gpu = torch.cuda.is_available()
    if use_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if use_gpu else "gloo"
    device_id = torch.device("cuda", torch.cuda.current_device()) if use_gpu else None
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), device_id=device_id)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
        t = torch.tensor([float(rank + 1)], device=device)
        dist.all_reduce(t)
        hosts: list = [None] * world
        dist.all_gather_object(hosts, f"{socket.gethostname()}:{os.getpid()}")
        expect = world * (world + 1) / 2
        if t.item() != expect:
            print(f"preflight --dist-check: rank {rank}: all_reduce gave {t.item()}, expected {expect}", file=sys.stderr)
            return 1
        dist.barrier()
        if rank == 0:
            print(f"dist-check ok: backend={backend} world_size={world} all_reduce={t.item():g} ranks={hosts}", flush=True)
        return 0
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m retnet_train.preflight",
                                description="Check a node before training (see the module docstring).")
    p.add_argument("--checkpoint-dir", type=Path, help="checkpoint directory: writable, shared, free space")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--params", help="parameter count for the free-space check, e.g. 1.3e9")
    g.add_argument("--model-preset", help="model preset YAML (configs/model/NAME.yaml) to count parameters of")
    p.add_argument("--keep-checkpoints", type=int, default=None,
                   help="checkpoints on disk at once (default: the config's checkpoint.keep_last + 1, else 2)")
    p.add_argument("--no-config", action="store_true",
                   help="do not compose the trainer's Hydra config from the overrides (another --module)")
    p.add_argument("--nproc-per-node", type=int, help="processes this node will start (one per GPU)")
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--shared-id", default="preflight", help="same on all nodes of one launch (e.g. the job id)")
    p.add_argument("--shared-timeout", type=float, default=None,
                   help="seconds to wait for the other nodes [PREFLIGHT_SHARED_TIMEOUT]; default 120")
    p.add_argument("--require-gpu", action="store_true", help="fail when no GPU is visible")
    p.add_argument("--vendor", choices=("cuda", "rocm"),
                   help="the cluster's GPU stack: fail when torch is another build (a CUDA wheel on AMD nodes)")
    p.add_argument("--require-fla", action="store_true", help="fail when fla's retention kernels cannot be imported")
    p.add_argument("--no-bf16-check", action="store_true", help="only warn when the GPU lacks bf16")
    p.add_argument("--dist-check", action="store_true",
                   help="run under torchrun: all_reduce across all ranks (gloo on CPU, nccl/rccl on GPU)")
    p.add_argument("--from-launcher-env", action="store_true",
                   help="started by torchrun or the deepspeed launcher on every node: take node rank, node "
                        "count and processes per node from its variables; only local rank 0 checks")
    p.add_argument("overrides", nargs="*", help="after --: the Hydra overrides of the run (model=NAME is read)")
    return p


def _validate(args: argparse.Namespace) -> None:
    if args.nnodes < 1:
        raise PreflightError(f"--nnodes={args.nnodes} must be >= 1")
    if not 0 <= args.node_rank < args.nnodes:
        raise PreflightError(f"--node-rank={args.node_rank} must be in [0, {args.nnodes - 1}]")
    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        raise PreflightError(f"--nproc-per-node={args.nproc_per_node} must be >= 1")
    if args.keep_checkpoints is not None and args.keep_checkpoints < 1:
        raise PreflightError(f"--keep-checkpoints={args.keep_checkpoints} must be >= 1")
    if args.shared_timeout is None:
        raw = os.environ.get("PREFLIGHT_SHARED_TIMEOUT", "120")
        try:
            args.shared_timeout = float(raw)
        except ValueError:
            raise PreflightError(f"PREFLIGHT_SHARED_TIMEOUT={raw!r} is not a number of seconds") from None
    if not args.shared_timeout > 0:
        raise PreflightError(f"--shared-timeout={args.shared_timeout} must be > 0")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.shared_id):
        raise PreflightError(f"--shared-id={args.shared_id!r} may only contain letters, digits, '_', '.', '-'")


def resolve_params(args: argparse.Namespace) -> tuple[int | None, str]:
    if args.params is not None:
        return parse_params(args.params), "--params"
    if args.model_preset is not None:
        return params_from_preset(args.model_preset), args.model_preset
    name = override_value(args.overrides, "model")
    if name:
        preset = REPO_ROOT / "configs" / "model" / f"{name}.yaml"
        if not preset.is_file():
            raise PreflightError(f"override model={name}: no preset {preset} (pass --params N)")
        return params_from_preset(preset), f"configs/model/{name}.yaml"
    return None, ""


def _int_env(env: dict, name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise PreflightError(f"{name}={env[name]!r} is not an integer") from None


def apply_launcher_env(args: argparse.Namespace, env: dict) -> bool:
    """Fill node rank / node count / processes per node from torchrun's or DeepSpeed's variables.

    Returns False for processes other than local rank 0 (they have nothing to check).
    """
    if "LOCAL_RANK" not in env:
        raise PreflightError("--from-launcher-env: LOCAL_RANK is unset (not started by torchrun or deepspeed)")
    if _int_env(env, "LOCAL_RANK") != 0:
        return False
    if "CROSS_RANK" in env:  # deepspeed.launcher.launch
        args.node_rank, args.nnodes = _int_env(env, "CROSS_RANK"), _int_env(env, "CROSS_SIZE")
        args.nproc_per_node = _int_env(env, "LOCAL_SIZE")
    elif "GROUP_RANK" in env:  # torchrun
        args.nproc_per_node = _int_env(env, "LOCAL_WORLD_SIZE")
        args.node_rank = _int_env(env, "GROUP_RANK")
        args.nnodes = _int_env(env, "WORLD_SIZE") // args.nproc_per_node
    else:
        raise PreflightError("--from-launcher-env: neither CROSS_RANK (deepspeed) nor GROUP_RANK (torchrun) is set")
    return True


# Hydra's own command-line flags that take a value; the preflight composes overrides only.
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.dist_check:
        return dist_check()
    view = None
    try:
        if args.from_launcher_env and not apply_launcher_env(args, dict(os.environ)):
            return 0
        _validate(args)
        overrides = hydra_overrides(args.overrides)
        if args.params is not None:
            parse_params(args.params)  # a bad --params is reported before the config is composed
        cfg = None if args.no_config else compose_trainer_config(overrides)
        if cfg is not None:
            world = args.nnodes * args.nproc_per_node if args.nproc_per_node else None
            try:
                view = trainer_view(cfg, world)
            except AttributeError as exc:  # the trainer's schema moved under us: fall back to options
                print(f"preflight: warning: trainer config layout not understood ({exc}); "
                      f"checks use the options only", file=sys.stderr)
        if args.params is not None or args.model_preset is not None or view is None:
            args.overrides = overrides
            params, source = resolve_params(args)
        else:
            params, source = view.params, "trainer config"
        ckpt_arg = args.checkpoint_dir.expanduser().absolute() if args.checkpoint_dir else None
        ckpt = ckpt_arg or (view.checkpoint_dir.expanduser().absolute() if view else None)
        if args.nnodes > 1 and ckpt is None:
            raise PreflightError(f"--nnodes={args.nnodes} needs --checkpoint-dir (or the trainer config): a "
                                 f"multi-node run must check that its checkpoint directory is shared")
    except PreflightError as exc:
        print(f"preflight: error: {exc}", file=sys.stderr)
        return 2
    rep = Report()
    print(f"preflight: node {args.node_rank} of {args.nnodes} on {socket.gethostname()}", flush=True)
    check_versions(rep)
    if args.vendor:
        check_vendor(rep, args.vendor)
    require_gpu = args.require_gpu or (view is not None and view.device == "cuda")
    check_gpus(rep, nproc_per_node=args.nproc_per_node, require_gpu=require_gpu,
               require_bf16=not args.no_bf16_check and (view is None or view.precision == "bf16"))
    check_fla(rep, require_fla=args.require_fla)
    if view is not None:
        rep.ok(f"trainer config composed ({' '.join(overrides) or 'defaults'}): checkpoints in {view.checkpoint_dir}, "
               f"precision {view.precision}, device {view.device}")
        for problem in view.problems:
            rep.fail(f"trainer config: {problem}")
        if ckpt_arg is not None and ckpt_arg != view.checkpoint_dir.expanduser().absolute():
            rep.fail(f"--checkpoint-dir {ckpt_arg} but the trainer will write checkpoints to "
                     f"{view.checkpoint_dir.expanduser().absolute()} (checkpoint.dir, else run.dir/checkpoints): "
                     f"add the override checkpoint.dir={ckpt_arg}")
    elif not args.no_config:
        rep.warn("no trainer config in this checkout (configs/config.yaml): checkpoint dir and model from options only")
    keep = args.keep_checkpoints or (view.keep if view else 2)
    if ckpt is None:
        rep.warn("no --checkpoint-dir: writable/shared/free-space checks skipped")
    else:
        if check_writable(rep, ckpt):
            check_disk(rep, ckpt, params, keep, source)
            check_shared(rep, ckpt, shared_id=args.shared_id, node_rank=args.node_rank, nnodes=args.nnodes,
                         timeout=args.shared_timeout)
    if rep.failures:
        print(f"preflight FAILED on node {args.node_rank} ({socket.gethostname()}): {len(rep.failures)} problem(s):",
              file=sys.stderr)
        for m in rep.failures:
            print(f"  - {m}", file=sys.stderr)
        return 1
    print(f"preflight passed on node {args.node_rank} ({socket.gethostname()})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
