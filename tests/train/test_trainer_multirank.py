"""The trainer for real: 2 CPU ranks (gloo) under torchrun driving DeepSpeed ZeRO 0-3."""

import signal
import time
from types import SimpleNamespace

import pytest
import torch
from trainer_helpers import (  # noqa: F401 (shards: a fixture)
    kill_run,
    losses,
    overrides,
    records,
    run_scenarios,
    shards,
    signal_run,
    start,
    train,
)

pytestmark = pytest.mark.slow

LONG = {"deepspeed.zero_stage": 2, "train.max_steps": 30}
NONFINITE = {
    "train.max_steps": 10,
    "checkpoint.interval": 1,
    "checkpoint.keep_last": 10,
    "optim.warmup_steps": 10,
    "train.inject_nonfinite_grad_at": "[3]",  # finite loss, infinite gradients
    "train.inject_nonfinite_at": "[5,6,7]",  # NaN loss
    "train.max_consecutive_nonfinite": 3,
}


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory):
    """Every run of this module that starts afresh and is not interrupted, in one torchrun launch
    (~13 s of start-up once, not nine times): name -> (run dir, Outcome)."""
    root = tmp_path_factory.mktemp("runs")
    todo = {f"zero{stage}": {"deepspeed.zero_stage": stage} for stage in (0, 1, 2, 3)}  # 6 steps, same data and init
    # global batch 512 tokens on 2 ranks of seq 64: per rank 4 micro-batches of 1 vs 1 of 4
    todo["accum"] = {"train.micro_batch_size": 1, "train.global_batch_tokens": 512, "train.max_steps": 3}
    todo["micro"] = {"train.micro_batch_size": 4, "train.global_batch_tokens": 512, "train.max_steps": 3}
    todo["uninterrupted"] = LONG
    for stage in (0, 2):
        todo[f"nonfinite{stage}"] = {"deepspeed.zero_stage": stage, **NONFINITE}
    scenarios = [
        (name, overrides(shards, root / name, **extra), *(["TrainingError"] if "nonfinite" in name else []))
        for name, extra in todo.items()
    ]
    outcomes = run_scenarios(scenarios, nproc=2, workdir=root / "launch")
    return {name: (root / name, outcomes[name]) for name in todo}


def test_zero_stages_match_stage0(runs):
    stage_runs = {stage: losses(runs[f"zero{stage}"][0]) for stage in (0, 1, 2, 3)}
    ref = stage_runs[0]
    assert sorted(ref) == [1, 2, 3, 4, 5, 6]
    assert ref[6] < ref[1] - 0.1  # it learns
    for stage in (1, 2, 3):
        for step, loss in ref.items():
            assert abs(stage_runs[stage][step] - loss) <= 1e-5, (stage, step)


def test_grad_accumulation_equals_larger_micro_batch(runs):
    la, lb = losses(runs["accum"][0]), losses(runs["micro"][0])
    assert sorted(la) == [1, 2, 3]
    for step in la:
        assert abs(la[step] - lb[step]) <= 1e-5


def wait_for(predicate, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early ({proc.returncode}):\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the trainer")


@pytest.fixture(scope="module")
def uninterrupted(runs):
    return losses(runs["uninterrupted"][0])


@pytest.fixture(scope="module")
def interrupted(shards, tmp_path_factory):
    """The LONG run interrupted twice, as a cluster may: SIGKILL after its step-8 checkpoint (a crash)
    and a resume; SIGTERM to that resumed run (preemption), which saves and exits; a resume to the
    end. Three launches serve both tests below (each interrupted a run of its own in two)."""
    run_dir = tmp_path_factory.mktemp("interrupted")
    ckpts = run_dir / "checkpoints"
    args = overrides(shards, run_dir, **LONG, **{"checkpoint.interval": 4})
    proc = start(args)
    wait_for(lambda: (ckpts / "step_00000008" / "COMPLETE").exists(), proc)
    kill_run(proc)  # the launcher and its workers: none of them logs another step
    killed = losses(run_dir)
    logged = len(records(run_dir))

    proc = start(args)
    wait_for(lambda: len(records(run_dir)) >= logged + 3, proc)
    signal_run(proc, signal.SIGTERM)  # what a scheduler does on preemption: every process gets it
    preempted_out, _ = proc.communicate(timeout=120)
    # (torchrun's agent itself exits non-zero on SIGTERM; the workers save and exit cleanly)
    stopped_at = max(r["step"] for r in records(run_dir)[logged:])
    # (the last resume prunes it: keep_last=2)
    saved_at_stop = (ckpts / f"step_{stopped_at:08d}" / "COMPLETE").exists()

    final = train(args)
    return SimpleNamespace(
        run_dir=run_dir,
        killed=killed,
        preempted_out=preempted_out,
        stopped_at=stopped_at,
        saved_at_stop=saved_at_stop,
        final_out=final.stdout,
    )


def test_sigterm_checkpoints_and_resume_is_exact(interrupted, uninterrupted):
    run = interrupted
    assert run.stopped_at < 30, "the signal arrived after the run finished; nothing was tested"
    assert "SIGTERM: checkpoint saved" in run.preempted_out, run.preempted_out[-3000:]
    assert run.saved_at_stop
    assert "resumed from" in run.final_out and f"at step {run.stopped_at}" in run.final_out
    got = losses(run.run_dir)
    assert sorted(got) == list(range(1, 31))
    for step, loss in uninterrupted.items():
        assert got[step] == loss, step  # bitwise: same data order, RNG, optimizer state


def test_kill9_after_checkpoint_resumes_exactly_and_keeps_last(interrupted, uninterrupted):
    run = interrupted
    ckpts = run.run_dir / "checkpoints"
    assert "resumed from" in run.preempted_out and "at step 8" in run.preempted_out  # the run after the kill
    got = losses(run.run_dir)
    for step, loss in uninterrupted.items():
        assert got[step] == loss, step
    for step, loss in run.killed.items():  # steps run twice (after the checkpoint, before the kill) agree too
        assert loss == uninterrupted[step]
    assert (ckpts / "latest").read_text() == "step_00000030"
    kept = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_"))
    assert kept == ["step_00000028", "step_00000030"]  # keep_last=2 (28 = 7 x 4, then the final step)


@pytest.mark.parametrize("stage", [0, 2])  # our GuardedAdamW (fp32 ZeRO-0) and DeepSpeed's overflow check (ZeRO-2)
def test_nonfinite_steps_are_skipped_then_the_run_stops_with_last_good_state(runs, stage):
    run_dir, outcome = runs[f"nonfinite{stage}"]  # NONFINITE: gradients infinite at step 3, NaN loss at 5-7
    # the run ends with the error the CLI prints before it exits with status 1
    assert outcome.error == "TrainingError"
    out = outcome.stderr + outcome.stdout
    assert "step 3 skipped (non-finite gradient norm)" in out and "step 5 skipped (non-finite loss)" in out
    assert "3 consecutive steps with non-finite loss or gradients" in outcome.message
    assert "weights of the last good step (4)" in outcome.message
    recs = [r for r in records(run_dir) if "skipped_steps" in r]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["skipped_steps"] for r in recs] == [0, 0, 1, 1, 2, 3, 4]
    assert [r["loss"] is None for r in recs] == [False, False, True, False, True, True, True]
    lr = [r["lr"] for r in recs]
    # each record's lr is the rate its step updated with: a skipped step does not advance the warm-up,
    # so the next step updates with the rate the skipped one would have used
    assert lr[0] < lr[1] < lr[2] == lr[3] < lr[4] == lr[5] == lr[6]
    ckpts = run_dir / "checkpoints"

    def weights(step):
        state = torch.load(ckpts / f"step_{step:08d}" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        return torch.cat([v.flatten() for v in state.values()])

    assert torch.equal(weights(2), weights(3))  # the bad-gradient step changed nothing
    assert not torch.equal(weights(3), weights(4))  # training went on
    assert torch.equal(weights(4), weights(7))  # nor did the three NaN-loss steps; saved at the stop
    client = torch.load(ckpts / "step_00000007" / "mp_rank_00_model_states.pt", weights_only=False)
    assert client["train_state"]["faults"] == {"consecutive": 3, "total": 4}
