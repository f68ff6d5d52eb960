"""retnet_train.preflight on one node: the CPU report end to end, the GPU requirement and vendor,
a checkpoint dir that is writable and has room for the checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
from preflight_helpers import cli, tiny_params

from retnet_train import preflight as pf


def test_cpu_node_passes_and_says_no_gpu(tmp_path):
    ck = tmp_path / "ck"
    r = cli(
        "--checkpoint-dir",
        str(ck),
        "--nproc-per-node",
        "1",
        "--",
        "model=tiny",
        "train.max_steps=3",
        f"checkpoint.dir={ck}",
        "checkpoint.keep_last=1",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert (
        f"[  ok] trainer config composed (model=tiny train.max_steps=3 checkpoint.dir={ck} checkpoint.keep_last=1)"
        in out
    )
    assert "[  ok] no GPU: CPU-only torch build" in out
    assert "torch 2." in out and "deepspeed " in out and "NCCL/RCCL: not in this torch build" in out
    assert "fla not installed" in out or "fla " in out
    assert f"checkpoint dir {tmp_path / 'ck'} is writable" in out
    n = tiny_params()
    assert f"{n / 1e6:.3g}M params (trainer config) x 16 B/param x 2 checkpoint(s)" in out  # keep_last + 1
    assert "preflight passed on node 0" in out
    assert not (tmp_path / "ck").exists()  # the probe and the dir made for it are gone: the trainer makes it


def test_the_checks_leave_no_directory_they_made_unless_something_was_written(tmp_path):
    (tmp_path / "runs").mkdir()
    ckpt = tmp_path / "runs" / "a" / "checkpoints"
    with pf.leaving_no_new_dirs(ckpt):
        assert pf.check_writable(pf.Report(), ckpt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"] and not (tmp_path / "runs" / "a").exists()
    with pf.leaving_no_new_dirs(ckpt):
        pf.check_writable(pf.Report(), ckpt)
        (tmp_path / "runs" / "a" / "config.yaml").write_text("")  # the run's own file: keep what holds it
    assert (tmp_path / "runs" / "a").is_dir() and not ckpt.exists()
    with pf.leaving_no_new_dirs(tmp_path / "b", enabled=False):  # several nodes: left as made
        pf.check_writable(pf.Report(), tmp_path / "b")
    assert (tmp_path / "b").is_dir()


def test_require_gpu_fails_on_cpu(tmp_path):
    r = cli("--require-gpu", "--no-config", "--checkpoint-dir", str(tmp_path))
    assert r.returncode == 1
    assert "[FAIL] no GPU: CPU-only torch build and --require-gpu was given" in r.stdout
    assert "preflight FAILED on node 0" in r.stderr and "--require-gpu" in r.stderr


@pytest.mark.parametrize(
    "vendor, expect", [("rocm", "AMD ROCm GPUs but torch"), ("cuda", "NVIDIA CUDA GPUs but torch")]
)
def test_vendor_mismatch_fails(vendor, expect):
    # rocm.sbatch with a CUDA (or CPU) torch wheel: caught before the GPU count confuses anyone.
    import torch

    rep = pf.Report()
    pf.check_vendor(rep, vendor)
    assert len(rep.failures) == 1 and expect in rep.failures[0] and "CPU-only build" in rep.failures[0]
    assert torch.__version__ in rep.failures[0]
    assert ("download.pytorch.org/whl/rocm" in rep.failures[0]) == (vendor == "rocm")


def test_unwritable_checkpoint_dir_fails_naming_it(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    rep = pf.Report()
    assert not pf.check_writable(rep, blocker / "ck")
    assert rep.failures == [f"checkpoint dir {blocker / 'ck'} is not writable: Not a directory (ENOTDIR)"]


def test_free_disk_against_checkpoint_size(tmp_path, monkeypatch):
    rep = pf.Report()
    pf.check_disk(rep, tmp_path, 1_300_000_000, 2, "--params")
    free = pf.shutil.disk_usage(tmp_path).free
    assert (rep.failures == []) == (free >= 1_300_000_000 * 16 * 2)
    monkeypatch.setattr(pf.shutil, "disk_usage", lambda p: type("U", (), {"free": 100 * 2**30})())
    rep = pf.Report()
    pf.check_disk(rep, tmp_path, 6_700_000_000, 1, "configs/model/6.7b.yaml")  # needs 99.8 GiB
    assert rep.failures == []
    pf.check_disk(rep, tmp_path, 6_700_000_000, 2, "configs/model/6.7b.yaml")  # needs 199.7 GiB
    assert rep.failures == [
        "not enough disk for checkpoints: 6.7B params (configs/model/6.7b.yaml) x 16 B/param "
        f"x 2 checkpoint(s) = 199.7 GiB; free on {tmp_path}: 100.0 GiB"
    ]
    rep = pf.Report()
    pf.check_disk(rep, tmp_path, None, 2, "")
    assert rep.lines[0][0] == "warn" and "free-space check skipped" in rep.lines[0][1]


NO_BF16 = (
    "bf16 is not supported on this GPU (pre-Ampere NVIDIA / pre-MI200 AMD); "
    "pass --no-bf16-check if your config trains in fp16/fp32"
)


@pytest.fixture
def v100(monkeypatch):
    """One visible pre-Ampere NVIDIA GPU (compute capability 7.0) on which torch can still create bf16
    tensors (emulation): torch.cuda as it looks there, down to is_bf16_supported's own logic."""
    import types

    import torch

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Tesla V100-SXM2-32GB")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: types.SimpleNamespace(major=7, minor=0))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True, raising=False)
    assert torch.cuda.is_bf16_supported()  # what torch answers by default: emulation counts


def test_pre_ampere_gpu_has_no_bf16(v100):
    rep = pf.Report()
    pf.check_gpus(rep, nproc_per_node=1, required_by="--require-gpu was given", require_bf16=True)
    assert rep.lines[0] == ("ok", "1 GPU(s): Tesla V100-SXM2-32GB")
    assert rep.lines[1:] == [("FAIL", NO_BF16)]
    rep = pf.Report()
    pf.check_gpus(
        rep, nproc_per_node=1, required_by="--require-gpu was given", require_bf16=False
    )  # an fp16 / fp32 run
    assert rep.lines[1:] == [("warn", "bf16 is not supported on this GPU")]


def test_more_processes_than_visible_gpus_fail(v100):
    """--nproc-per-node one above the visible GPUs fails, naming both; equal to them passes."""
    rep = pf.Report()
    pf.check_gpus(rep, nproc_per_node=2, required_by=None, require_bf16=False)
    assert rep.failures == ["--nproc-per-node=2 but only 1 GPU(s) are visible"]
    rep = pf.Report()
    pf.check_gpus(rep, nproc_per_node=1, required_by=None, require_bf16=False)
    assert rep.failures == []


@pytest.mark.parametrize("precision, fails", [("bf16", True), ("bf16-mixed", True), ("fp16", False), ("fp32", False)])
def test_bf16_check_follows_the_configs_precision(v100, precision, fails):
    from retnet_train.preflight.cli import _check_node

    args = pf.build_parser().parse_args(["--nproc-per-node", "1"])
    view = pf.TrainerView(Path("/unused"), keep=2, params=1, precision=precision, device="cuda", problems=[])
    rep = pf.Report()
    _check_node(rep, args, view)
    assert [f for f in rep.failures if "bf16" in f] == ([NO_BF16] if fails else [])


def test_a_gpu_required_by_the_config_names_the_key(monkeypatch):
    # train.device=cuda on a node without a GPU: the failure names the key that asked for one, not a
    # --require-gpu the command line never had.
    import torch

    from retnet_train.preflight.cli import _check_node

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    view = pf.TrainerView(Path("/unused"), keep=2, params=1, precision="fp32", device="cuda", problems=[])
    rep = pf.Report()
    _check_node(rep, pf.build_parser().parse_args([]), view)
    assert [f for f in rep.failures if "GPU" in f] == ["no GPU: CPU-only torch build and train.device=cuda needs one"]
    rep = pf.Report()
    _check_node(rep, pf.build_parser().parse_args(["--require-gpu"]), view)
    assert [f for f in rep.failures if "GPU" in f] == ["no GPU: CPU-only torch build and --require-gpu was given"]
