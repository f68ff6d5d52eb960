"""The directories a run writes (components/run_dir.py): checked at start naming the key, owned by one
live trainer, and an earlier run's metrics set aside instead of appended to."""

import json
import os
import subprocess
import sys

import pytest
from trainer_helpers import REPO, records, shards, typed  # noqa: F401 (shards: a fixture)

from retnet_train.components.run_dir import (
    LOCK_NAME,
    DirLock,
    set_aside_changed_config,
    set_aside_metrics,
    write_problem,
)
from retnet_train.trainer import Trainer

HOLD_LOCK = """
import sys, time
from retnet_train.components.run_dir import DirLock
assert DirLock(sys.argv[1], "run.dir").acquire() is None
print("locked", flush=True)
time.sleep(600)
"""


def test_write_problems_name_the_key(tmp_path):
    (tmp_path / "file").write_text("x")
    assert write_problem("run.dir", str(tmp_path / "new" / "deeper")) is None
    assert not (tmp_path / "new").exists()  # checked, not created
    assert (
        write_problem("run.dir", str(tmp_path / "file")) == f"run.dir: {tmp_path / 'file'} is a file, not a directory"
    )
    under = tmp_path / "file"
    expected = f"checkpoint.dir: {under / 'ckpt'} lies under {under}, which is a file, not a directory"
    assert write_problem("checkpoint.dir", str(under / "ckpt")) == expected
    assert sorted(os.listdir(tmp_path)) == ["file"]  # the write test leaves nothing behind
    # a directory that takes no files (/proc answers ENOENT, which alone would read as if /proc were missing)
    assert write_problem("checkpoint.dir", "/proc/ckpt") == (
        "checkpoint.dir: cannot write /proc/ckpt (creating a file in /proc failed: No such file or directory)"
    )


def hold_lock(directory):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(directory)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_refuses_a_second_trainer_and_dies_with_its_holder(tmp_path):
    run_dir = tmp_path / "run"
    assert DirLock(str(run_dir), "run.dir").probe() is None and not run_dir.exists()  # probing creates nothing
    holder = hold_lock(run_dir)
    try:
        problem = DirLock(str(run_dir), "run.dir").acquire()
        assert problem.startswith(f"run.dir={run_dir} is in use by another trainer (pid {holder.pid} on ")
        assert DirLock(str(run_dir), "run.dir").probe() == problem
    finally:
        holder.kill()  # a crash: no clean-up runs
        holder.wait()
    assert DirLock(str(run_dir), "run.dir").probe() is None  # its holder died: free, and the probe kept nothing
    mine = DirLock(str(run_dir), "run.dir")
    assert mine.acquire() is None
    assert (run_dir / LOCK_NAME).read_text().startswith(f"pid {os.getpid()} on ")
    mine.release()


def test_a_lock_on_a_directory_it_made_is_cleaned_up_when_nothing_else_was_written(tmp_path):
    lock = DirLock(str(tmp_path / "run"), "run.dir")
    assert lock.acquire() is None
    lock.release()
    assert not (tmp_path / "run").exists()
    (tmp_path / "kept").mkdir()
    lock = DirLock(str(tmp_path / "kept"), "run.dir")
    lock.acquire()
    lock.release()
    assert os.listdir(tmp_path / "kept") == [LOCK_NAME]  # not ours to remove


def test_set_aside_metrics_takes_the_first_free_number(tmp_path):
    assert set_aside_metrics(str(tmp_path)) is None
    (tmp_path / "metrics.jsonl").write_text("a\n")
    (tmp_path / "metrics.1.jsonl").write_text("older\n")
    assert set_aside_metrics(str(tmp_path)) == str(tmp_path / "metrics.2.jsonl")
    assert (tmp_path / "metrics.2.jsonl").read_text() == "a\n" and not (tmp_path / "metrics.jsonl").exists()


def test_set_aside_metrics_keeps_their_config_beside_them(tmp_path):
    """config.yaml describes the metrics set aside: the new run's config would overwrite it."""
    (tmp_path / "metrics.jsonl").write_text("a\n")
    (tmp_path / "config.yaml").write_text("optim:\n  lr: 0.1\n")
    (tmp_path / "config.1.yaml").write_text("older\n")  # its metrics.1.jsonl is gone: 1 is not free
    assert set_aside_metrics(str(tmp_path)) == str(tmp_path / "metrics.2.jsonl")
    assert (tmp_path / "config.2.yaml").read_text() == "optim:\n  lr: 0.1\n" and not (tmp_path / "config.yaml").exists()
    assert (tmp_path / "config.1.yaml").read_text() == "older\n"


@pytest.mark.parametrize(
    "where,key", [("run", "run.dir"), ("checkpoint", "checkpoint.dir"), ("profile", "profile.enabled")]
)
def test_trainer_refuses_a_directory_it_cannot_write_before_building(shards, tmp_path, process_group, where, key):
    blocker = tmp_path / "run" / "profile" if where == "profile" else tmp_path / "file"
    blocker.parent.mkdir(exist_ok=True)
    blocker.write_text("x")
    extra = {
        "run": {"run.dir": str(blocker / "run")},
        "checkpoint": {"checkpoint.dir": str(blocker / "ckpt")},
        "profile": {"profile.enabled": "true", "profile.start_step": 1},
    }[where]
    trainer = Trainer(typed(shards, tmp_path / "run", **extra))
    with pytest.raises(ValueError, match=f"^{key}: .* lies under {blocker}, which is a file, not a directory"):
        trainer.train()
    assert not hasattr(trainer, "engine")  # refused before the model and engine were built


def test_trainer_refuses_a_run_dir_another_trainer_holds(shards, tmp_path, process_group):
    run_dir = tmp_path / "run"
    holder = hold_lock(run_dir)
    try:
        with pytest.raises(ValueError, match=f"run.dir={run_dir} is in use by another trainer \\(pid {holder.pid} "):
            Trainer(typed(shards, run_dir, **{"train.max_steps": 1})).train()
    finally:
        holder.kill()
        holder.wait()
    assert os.listdir(run_dir) == [LOCK_NAME]  # nothing of ours written there


def test_fresh_start_sets_an_earlier_runs_metrics_aside(shards, tmp_path, process_group, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    earlier = [{"step": 1, "loss": 9.0}, {"step": 2, "loss": 8.0}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in earlier))
    Trainer(typed(shards, run_dir, **{"train.max_steps": 1, "checkpoint.save_at_end": "false"})).train()
    assert f"kept as {run_dir / 'metrics.1.jsonl'}" in capsys.readouterr().out
    assert [json.loads(line) for line in (run_dir / "metrics.1.jsonl").read_text().splitlines()] == earlier
    assert [r["step"] for r in records(run_dir)] == [1, 1]  # this run's training and validation lines only


def test_trainer_refuses_a_checkpoint_dir_another_trainer_holds(shards, tmp_path, process_group):
    """Run a (run.dir a, checkpoints in a/checkpoints) holds both locks; run b pointing its
    checkpoint.dir there is refused although its run.dir is free."""
    theirs = tmp_path / "a" / "checkpoints"
    holder = hold_lock(theirs)
    try:
        with pytest.raises(ValueError, match=f"checkpoint.dir={theirs} is in use by another trainer"):
            Trainer(typed(shards, tmp_path / "b", **{"checkpoint.dir": str(theirs), "train.max_steps": 1})).train()
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "b").exists()  # made for its lock, then removed again


def test_the_preflight_refuses_a_run_dir_a_live_trainer_holds(tmp_path, capsys):
    from retnet_train import preflight as pf

    run_dir = tmp_path / "run"
    holder = hold_lock(run_dir)
    try:
        assert pf.main(["--", "experiment=tiny_cpu", f"run.dir={run_dir}"]) == 1
        assert f"trainer config: run.dir={run_dir} is in use by another trainer (pid {holder.pid} on " in (
            capsys.readouterr().err
        )
    finally:
        holder.kill()
        holder.wait()
    assert pf.main(["--", "experiment=tiny_cpu", f"run.dir={run_dir}"]) == 0


def test_set_aside_changed_config_keeps_the_replaced_one_under_the_step(tmp_path):
    (tmp_path / "config.yaml").write_text("optim:\n  lr: 0.1\n")
    keep = lambda lr: set_aside_changed_config(str(tmp_path), {"optim": {"lr": lr}}, 7)  # noqa: E731
    assert keep(0.1) is None  # unchanged: kept in place
    assert keep(0.2) == str(tmp_path / "config.until_step_7.yaml")
    assert (tmp_path / "config.until_step_7.yaml").read_text() == "optim:\n  lr: 0.1\n"
    (tmp_path / "config.yaml").write_text("optim:\n  lr: 0.2\n")
    assert keep(0.3) == str(tmp_path / "config.until_step_7.1.yaml")
    assert (tmp_path / "config.until_step_7.yaml").read_text() == "optim:\n  lr: 0.1\n"


def test_a_resume_with_another_config_keeps_the_one_it_replaces(shards, tmp_path, process_group, capsys):
    run_dir = tmp_path / "run"
    first = Trainer(typed(shards, run_dir, **{"train.max_steps": 1}))
    first.train()
    # the config as written and read back equals the resolved one: an unchanged resume renames nothing
    assert set_aside_changed_config(str(run_dir), first.resolved, 1) is None
    written = (run_dir / "config.yaml").read_text()
    Trainer(typed(shards, run_dir, **{"train.max_steps": 2})).train()
    assert f"kept as {run_dir / 'config.until_step_1.yaml'}" in capsys.readouterr().out
    assert (run_dir / "config.until_step_1.yaml").read_text() == written and "max_steps: 1" in written
    assert "max_steps: 2" in (run_dir / "config.yaml").read_text()
    assert sorted(p.name for p in run_dir.glob("config*.yaml")) == ["config.until_step_1.yaml", "config.yaml"]
