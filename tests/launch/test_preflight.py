"""retnet_train.preflight: CPU report, GPU requirement, checkpoint dir writable / shared / big
enough, parameter counts from presets and overrides, launcher environments, bad arguments."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from retnet_train import preflight as pf
from retnet_train.preflight import cli as preflight_cli

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "retnet_train.preflight", *args],
        cwd=ROOT,
        env=e,
        capture_output=True,
        text=True,
        timeout=120,
    )


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
    n = pf.params_from_preset(ROOT / "configs/model/tiny.yaml")
    assert f"{n / 1e6:.3g}M params (trainer config) x 16 B/param x 2 checkpoint(s)" in out  # keep_last + 1
    assert "preflight passed on node 0" in out
    assert not any(p.name.startswith(".preflight") for p in (tmp_path / "ck").iterdir())  # probe removed


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


def test_parameter_counts():
    import torch
    import yaml

    from retnet_train.model import build_model, model_config_from_dict

    preset = yaml.safe_load((ROOT / "configs/model/tiny.yaml").read_text())
    ref = sum(p.numel() for p in build_model(model_config_from_dict(preset)).parameters())
    assert pf.params_from_preset(ROOT / "configs/model/tiny.yaml") == ref
    # The paper's sizes, to within 5% (the name is the size).
    for name, size in [("1.3b", 1.3e9), ("6.7b", 6.7e9)]:
        assert abs(pf.params_from_preset(ROOT / f"configs/model/{name}.yaml") / size - 1) < 0.05
    assert pf.parse_params("1.3e9") == 1_300_000_000 and pf.parse_params("125000000") == 125_000_000
    assert torch.get_default_device().type == "cpu"  # the meta-device build leaves no global state


def test_params_come_from_the_model_override(tmp_path):
    args = pf.build_parser().parse_args(["--", "experiment=x", "+model=tiny", "optim.model=1.3b"])
    n, src = pf.resolve_params(args)
    assert src == "configs/model/tiny.yaml" and n == pf.params_from_preset(ROOT / "configs/model/tiny.yaml")
    assert pf.override_value(["model=a", "model=b"], "model") == "b"
    assert pf.override_value(["++model=c"], "model") == "c"
    assert pf.resolve_params(pf.build_parser().parse_args(["--params", "2e9", "--", "model=tiny"])) == (
        2_000_000_000,
        "--params",
    )
    assert pf.resolve_params(pf.build_parser().parse_args([])) == (None, "")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--params", "many"], "--params 'many': not a number"),
        (["--params", "0"], "--params '0': must be a positive parameter count"),
        (["--params", "nan"], "--params 'nan': must be a positive parameter count"),
        (["--no-config", "--", "model=nope"], "override model=nope: no preset"),
        (["--", "model=nope"], "Could not find 'model/nope'"),
        (["--", "train.no_such_key=1"], "train.no_such_key"),
        (["--nnodes", "2", "--checkpoint-dir", "/x", "--node-rank", "2"], "--node-rank=2 must be in [0, 1]"),
        (["--nnodes", "2", "--no-config"], "--nnodes=2 needs --checkpoint-dir"),
        (["--keep-checkpoints", "0"], "--keep-checkpoints=0 must be >= 1"),
        (["--shared-id", "a/b"], "--shared-id='a/b' may only contain"),
        (["--nproc-per-node", "0"], "--nproc-per-node=0 must be >= 1"),
    ],
)
def test_bad_arguments(args, fragment, capsys):
    assert pf.main(args) == 2
    assert fragment in capsys.readouterr().err


def test_bad_model_presets(tmp_path):
    bad = tmp_path / "bad.yaml"
    for text, fragment in [
        ("d_model: [", "not valid YAML"),
        ("- 1\n- 2\n", "expected a mapping"),
        ("arch: retnet\nd_modle: 64\n", "model.d_modle: unknown key"),
        ("arch: retnet\nd_model: 100\nn_heads: 3\n", "does not divide"),
    ]:
        bad.write_text(text)
        with pytest.raises(pf.PreflightError) as exc:
            pf.params_from_preset(bad)
        assert str(exc.value).startswith(f"--model-preset {bad}: ") and fragment in str(exc.value)
    with pytest.raises(pf.PreflightError, match="no such file"):
        pf.params_from_preset(tmp_path / "missing.yaml")


# ---------------------------------------------------------------- the trainer's config


def test_trainer_config_problems_fail_before_launch(tmp_path, capsys):
    # What the trainer would only find out after the queue: batch arithmetic for this world size, a
    # missing tokenizer, and a --checkpoint-dir the trainer will not write to.
    rc = pf.main(
        [
            "--nproc-per-node",
            "3",
            "--checkpoint-dir",
            str(tmp_path / "elsewhere"),
            "--",
            "experiment=tiny_cpu",
            f"run.dir={tmp_path / 'run'}",
            "data.tokenizer=/no/such.model",
            "--cfg",
            "job",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 1
    assert "trainer config: train.global_batch_tokens=2048 is not a multiple of" in err and "(world size 3)" in err
    assert "trainer config: data.tokenizer=/no/such.model: no such file" in err
    assert (
        f"--checkpoint-dir {tmp_path / 'elsewhere'} but the trainer will write checkpoints to "
        f"{tmp_path / 'run' / 'checkpoints'}"
    ) in err and f"checkpoint.dir={tmp_path / 'elsewhere'}" in err


def test_trainer_config_gives_checkpoint_dir_and_size(tmp_path, capsys):
    rc = pf.main(["--", "experiment=tiny_cpu", f"run.dir={tmp_path / 'run'}", "checkpoint.keep_last=4"])
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    n = pf.params_from_preset(ROOT / "configs/model/tiny.yaml")
    assert f"checkpoint dir {tmp_path / 'run' / 'checkpoints'} is writable" in out
    assert f"{n / 1e6:.3g}M params (trainer config) x 16 B/param x 5 checkpoint(s)" in out
    assert pf.hydra_overrides(["-m", "a=1", "--cfg", "job", "-p", "x", "b=2"]) == ["a=1", "b=2"]


# ---------------------------------------------------------------- shared checkpoint dir


def run_nodes(dirs: list[Path], timeout: float = 10.0, shared_id: str = "job1", start_order=None) -> list[pf.Report]:
    reports = [pf.Report() for _ in dirs]
    order = start_order or range(len(dirs))

    def node(r):
        pf.check_shared(reports[r], dirs[r], shared_id=shared_id, node_rank=r, nnodes=len(dirs), timeout=timeout)

    threads = [threading.Thread(target=node, args=(r,)) for r in order]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 30)
    return reports


def test_shared_dir_passes_on_all_nodes_and_leaves_nothing(tmp_path):
    reports = run_nodes([tmp_path] * 3, start_order=[2, 1, 0])  # the others may start before node 0
    assert [r.failures for r in reports] == [[], [], []]
    assert reports[0].lines[-1][1] == f"checkpoint dir {tmp_path} is shared by all 3 nodes"
    assert reports[2].lines[-1][1] == f"checkpoint dir {tmp_path} is shared with node 0"
    assert list(tmp_path.iterdir()) == []


def test_stale_files_of_an_earlier_attempt_do_not_confuse_it(tmp_path):
    # A requeued job keeps its id: marker, done and ack of a crashed attempt are on disk.
    d = tmp_path / ".preflight"
    d.mkdir()
    (d / "job1.marker").write_text(json.dumps({"nonce": "old", "host": "x"}))
    (d / "job1.done").write_text("old")
    (d / "job1.ack-1").write_text("old")
    reports = run_nodes([tmp_path] * 2, start_order=[0, 1])
    assert [r.failures for r in reports] == [[], []]


def test_node_local_dir_fails_on_every_node(tmp_path):
    a, b = tmp_path / "node0-local", tmp_path / "node1-local"
    a.mkdir(), b.mkdir()
    reports = run_nodes([a, b], timeout=1.0)
    assert len(reports[0].failures) == 1 and len(reports[1].failures) == 1
    assert f"checkpoint dir {a} is not shared: node(s) [1] did not acknowledge" in reports[0].failures[0]
    assert f"checkpoint dir {b} is not shared (node 1): node 0's marker" in reports[1].failures[0]
    assert "node-local storage" in reports[1].failures[0]


HINT = (
    "is it node-local storage (/tmp, local NVMe, a per-node mount)? Checkpoints must be on a filesystem all nodes mount"
)


def test_node_local_dir_messages_and_what_is_left(tmp_path):
    a, b = tmp_path / "node0-local", tmp_path / "node1-local"
    a.mkdir(), b.mkdir()
    reports = run_nodes([a, b], timeout=0.5)
    assert reports[0].failures == [
        f"checkpoint dir {a} is not shared: node(s) [1] did not acknowledge node 0's marker "
        f"{a / '.preflight' / 'job1.marker'} within 0.5s; {HINT} (or did those nodes not start the preflight?)"
    ]
    assert reports[1].failures == [
        f"checkpoint dir {b} is not shared (node 1): node 0's marker {b / '.preflight' / 'job1.marker'} "
        f"never appeared within 0.5s; {HINT}"
    ]
    assert list((a / ".preflight").iterdir()) == []  # node 0 took its marker back


def test_a_node_that_sees_the_marker_but_never_the_completion_fails(tmp_path):
    d = tmp_path / ".preflight"
    d.mkdir()
    (d / "job1.marker").write_text(json.dumps({"nonce": "abc", "host": "x"}))
    rep = pf.Report()
    pf.check_shared(rep, tmp_path, shared_id="job1", node_rank=2, nnodes=3, timeout=0.5)
    assert rep.failures == [
        f"checkpoint dir {tmp_path} is not shared (node 2): saw node 0's marker but not its completion "
        f"within 0.5s; {HINT}"
    ]
    assert (d / "job1.ack-2").read_text() == "abc"  # acknowledged, then waited in vain


def test_one_node_needs_no_handshake(tmp_path):
    rep = pf.Report()
    pf.check_shared(rep, tmp_path, shared_id="job1", node_rank=0, nnodes=1, timeout=0.5)
    assert rep.lines == [("ok", "checkpoint dir sharing: single node, not needed")]
    assert list(tmp_path.iterdir()) == []


def test_two_node_cli_through_the_shared_dir(tmp_path):
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "retnet_train.preflight",
                "--checkpoint-dir",
                str(tmp_path),
                "--nnodes",
                "2",
                "--node-rank",
                str(r),
                "--shared-id",
                "cli",
                "--shared-timeout",
                "60",
                "--params",
                "1e6",
                "--no-config",
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (1, 0)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "is shared with node 0" in outs[0] and "is shared by all 2 nodes" in outs[1]


# ---------------------------------------------------------------- launcher environments


def test_launcher_environments():
    p = pf.build_parser()
    args = p.parse_args([])
    assert pf.apply_launcher_env(args, {"LOCAL_RANK": "0", "CROSS_RANK": "2", "CROSS_SIZE": "4", "LOCAL_SIZE": "8"})
    assert (args.node_rank, args.nnodes, args.nproc_per_node) == (2, 4, 8)
    args = p.parse_args([])
    assert pf.apply_launcher_env(
        args, {"LOCAL_RANK": "0", "GROUP_RANK": "1", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}
    )
    assert (args.node_rank, args.nnodes, args.nproc_per_node) == (1, 2, 8)
    assert not pf.apply_launcher_env(p.parse_args([]), {"LOCAL_RANK": "3", "CROSS_RANK": "0"})
    with pytest.raises(pf.PreflightError, match="LOCAL_RANK is unset"):
        pf.apply_launcher_env(p.parse_args([]), {})
    with pytest.raises(pf.PreflightError, match="neither CROSS_RANK"):
        pf.apply_launcher_env(p.parse_args([]), {"LOCAL_RANK": "0"})
    with pytest.raises(pf.PreflightError, match="CROSS_SIZE='x' is not an integer"):
        pf.apply_launcher_env(p.parse_args([]), {"LOCAL_RANK": "0", "CROSS_RANK": "0", "CROSS_SIZE": "x"})


def test_dist_check_outside_a_launcher_names_the_missing_variable():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    r = subprocess.run(
        [sys.executable, "-m", "retnet_train.preflight", "--dist-check"],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "RANK is unset: run under torchrun" in r.stderr


def test_shared_timeout_from_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("PREFLIGHT_SHARED_TIMEOUT", "soon")
    assert pf.main(["--nnodes", "2", "--checkpoint-dir", "/tmp", "--no-config"]) == 2
    assert "PREFLIGHT_SHARED_TIMEOUT='soon' is not a number of seconds" in capsys.readouterr().err
    monkeypatch.setenv("PREFLIGHT_SHARED_TIMEOUT", "7.5")
    args = pf.build_parser().parse_args([])
    pf._validate(args)
    assert args.shared_timeout == 7.5


# ---------------------------------------------------------------- what the checks fall back to


def test_options_only_without_a_checkpoint_dir(capsys):
    assert pf.main(["--no-config", "--params", "1e6"]) == 0
    out = capsys.readouterr().out
    assert "[warn] no --checkpoint-dir: writable/shared/free-space checks skipped" in out
    assert "trainer config" not in out


def test_checkout_without_a_trainer_config_warns_and_uses_the_options(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(preflight_cli, "compose_trainer_config", lambda overrides: None)
    assert pf.main(["--checkpoint-dir", str(tmp_path), "--params", "1e6", "--keep-checkpoints", "3"]) == 0
    out = capsys.readouterr().out
    assert (
        "[warn] no trainer config in this checkout (configs/config.yaml): checkpoint dir and model from options only"
    ) in out
    assert f"[  ok] disk: 1M params (--params) x 16 B/param x 3 checkpoint(s) = 45.8 MiB; free on {tmp_path}" in out


def test_unknown_trainer_config_layout_falls_back_to_the_options(tmp_path, monkeypatch, capsys):
    def moved(cfg, world_size):
        raise AttributeError("'TrainConfig' object has no attribute 'checkpoint'")

    monkeypatch.setattr(preflight_cli, "trainer_view", moved)
    assert pf.main(["--checkpoint-dir", str(tmp_path), "--", "model=tiny"]) == 0
    out, err = capsys.readouterr()
    assert (
        "preflight: warning: trainer config layout not understood ('TrainConfig' object has no attribute "
        "'checkpoint'); checks use the options only"
    ) in err
    assert "[warn] no trainer config in this checkout" in out
    n = pf.params_from_preset(ROOT / "configs/model/tiny.yaml")
    assert f"{n / 1e6:.3g}M params (configs/model/tiny.yaml) x 16 B/param x 2 checkpoint(s)" in out


def test_launcher_processes_other_than_local_rank_0_check_nothing(monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert pf.main(["--from-launcher-env", "--nnodes", "0"]) == 0  # not even the options are checked
    assert capsys.readouterr() == ("", "")
