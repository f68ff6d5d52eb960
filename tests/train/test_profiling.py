"""profile.*: torch.profiler over a window of optimizer steps, written under <run.dir>/profile/rank<r>/."""

import json

import pytest
import torch

from retnet_train.components.config import TrainConfig, check_values
from retnet_train.components.profiling import Profiler

SETTINGS = dict(enabled=True, start_step=3, steps=2, ranks=[0], memory_snapshot=False)


def run_steps(profiler, first, last):
    """A stand-in train loop: step n runs a matmul inside a range named work_<n>."""
    a = torch.randn(16, 16)
    for done in range(first, last):
        profiler.step(done)
        with torch.profiler.record_function(f"work_{done + 1}"):
            torch.mm(a, a)
    profiler.close()


def event_names(path):
    return {e.get("name") for e in json.loads(path.read_text())["traceEvents"]}


def test_trace_covers_only_the_window(tmp_path):
    run_steps(Profiler(str(tmp_path / "rank0"), 0, 1, "cpu", 0, **SETTINGS), 0, 6)
    assert sorted(p.name for p in (tmp_path / "rank0").iterdir()) == [
        "steps3-4.key_averages.txt",
        "steps3-4.pt.trace.json",
    ]
    names = event_names(tmp_path / "rank0" / "steps3-4.pt.trace.json")
    assert "aten::mm" in names
    assert {n for n in names if n.startswith(("work_", "ProfilerStep#"))} == {
        "work_3",
        "work_4",
        "ProfilerStep#3",
        "ProfilerStep#4",
    }
    table = (tmp_path / "rank0" / "steps3-4.key_averages.txt").read_text()
    assert "aten::mm" in table and "Self CPU" in table


def test_window_cut_short_by_the_end_of_the_run(tmp_path):
    settings = {**SETTINGS, "start_step": 1, "steps": 5}
    run_steps(Profiler(str(tmp_path), 0, 1, "cpu", 0, **settings), 0, 2)  # the run ends after step 2
    names = event_names(tmp_path / "steps1-2.pt.trace.json")
    assert {"work_1", "work_2", "ProfilerStep#1", "ProfilerStep#2"} <= names


@pytest.mark.parametrize("change", [dict(enabled=False), dict(ranks=[1])])
def test_disabled_or_other_rank_writes_nothing(tmp_path, change):
    run_steps(Profiler(str(tmp_path / "out"), 0, 2, "cpu", 0, **{**SETTINGS, **change}), 0, 6)
    assert not (tmp_path / "out").exists()


def test_resumed_past_the_window_profiles_nothing(tmp_path, capsys):
    run_steps(Profiler(str(tmp_path / "out"), 0, 1, "cpu", 4, **SETTINGS), 4, 6)
    assert not (tmp_path / "out").exists()
    assert "profile.start_step=3" in capsys.readouterr().out


def test_memory_snapshot_without_cuda_is_skipped_with_one_warning(tmp_path, capsys):
    run_steps(Profiler(str(tmp_path), 0, 1, "cpu", 0, **{**SETTINGS, "memory_snapshot": True}), 0, 6)
    assert capsys.readouterr().out.count("profile.memory_snapshot") == 1
    assert (tmp_path / "steps3-4.pt.trace.json").exists() and not list(tmp_path.glob("*.pickle"))


def test_ranks_outside_the_world_are_refused(tmp_path):
    with pytest.raises(ValueError, match="profile.ranks"):
        Profiler(str(tmp_path), 0, 2, "cpu", 0, **{**SETTINGS, "ranks": [0, 2]})


@pytest.mark.parametrize("key,value,enabled", [("start_step", 0, False), ("steps", 0, False), ("start_step", 11, True)])
def test_config_errors_name_the_key(key, value, enabled):
    cfg = TrainConfig()
    cfg.data.paths, cfg.train.max_steps, cfg.profile.enabled = ["/d/web"], 10, enabled
    check_values(cfg)
    setattr(cfg.profile, key, value)
    with pytest.raises(ValueError, match=f"profile.{key}"):
        check_values(cfg)


def test_trainer_writes_the_trace(short_run):
    run, proc = short_run  # 3 steps, profile.start_step=2, profile.steps=2 (and selective recomputation)
    out = run / "profile" / "rank0"
    assert sorted(p.name for p in out.iterdir()) == ["steps2-3.key_averages.txt", "steps2-3.pt.trace.json"]
    names = event_names(out / "steps2-3.pt.trace.json")
    assert {"ProfilerStep#2", "ProfilerStep#3", "aten::mm"} <= names and "ProfilerStep#1" not in names
    assert "profile: " in proc.stdout
