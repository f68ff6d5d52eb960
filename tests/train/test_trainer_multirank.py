"""The trainer for real: 2 CPU ranks (gloo) under torchrun driving DeepSpeed ZeRO 0-3."""
import os
import signal
import time

import pytest
import torch

from trainer_helpers import losses, overrides, records, shards, start, train  # noqa: F401 (shards: a fixture)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stage_runs(shards, tmp_path_factory):
    """6 steps under each ZeRO stage (fp32, same data and init)."""
    runs = {}
    for stage in (0, 1, 2, 3):
        run_dir = tmp_path_factory.mktemp(f"zero{stage}")
        train(overrides(shards, run_dir, **{"deepspeed.zero_stage": stage}))
        runs[stage] = losses(run_dir)
    return runs


def test_zero_stages_match_stage0(stage_runs):
    ref = stage_runs[0]
    assert sorted(ref) == [1, 2, 3, 4, 5, 6]
    assert ref[6] < ref[1] - 0.1  # it learns
    for stage in (1, 2, 3):
        for step, loss in ref.items():
            assert abs(stage_runs[stage][step] - loss) <= 1e-5, (stage, step)


def test_grad_accumulation_equals_larger_micro_batch(shards, tmp_path):
    a, b = tmp_path / "accum", tmp_path / "micro"
    # global batch 512 tokens on 2 ranks of seq 64: 4 micro-batches of 1 vs 1 of 4... per rank 4 sequences
    train(overrides(shards, a, **{"train.micro_batch_size": 1, "train.global_batch_tokens": 512, "train.max_steps": 3}))
    train(overrides(shards, b, **{"train.micro_batch_size": 4, "train.global_batch_tokens": 512, "train.max_steps": 3}))
    la, lb = losses(a), losses(b)
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


LONG = {"deepspeed.zero_stage": 2, "train.max_steps": 30}


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full")
    train(overrides(shards, run_dir, **LONG))
    return losses(run_dir)


def test_sigterm_checkpoints_and_resume_is_exact(shards, tmp_path, uninterrupted):
    proc = start(overrides(shards, tmp_path, **LONG))
    wait_for(lambda: len(losses(tmp_path)) >= 3, proc)
    os.killpg(proc.pid, signal.SIGTERM)  # what a scheduler does on preemption: every process gets it
    out, _ = proc.communicate(timeout=120)
    # (torchrun's agent itself exits non-zero on SIGTERM; the workers save and exit cleanly)
    stopped_at = max(losses(tmp_path))
    assert stopped_at < 30, "the signal arrived after the run finished; nothing was tested"
    assert "SIGTERM: checkpoint saved" in out, out[-3000:]
    assert (tmp_path / "checkpoints" / f"step_{stopped_at:08d}" / "COMPLETE").exists()
    resumed = train(overrides(shards, tmp_path, **LONG))
    assert "resumed from" in resumed.stdout and f"at step {stopped_at}" in resumed.stdout
    got = losses(tmp_path)
    assert sorted(got) == list(range(1, 31))
    for step, loss in uninterrupted.items():
        assert got[step] == loss, step  # bitwise: same data order, RNG, optimizer state


def test_kill9_after_checkpoint_resumes_exactly_and_keeps_last(shards, tmp_path, uninterrupted):
    args = overrides(shards, tmp_path, **LONG, **{"checkpoint.interval": 4})
    proc = start(args)
    ckpts = tmp_path / "checkpoints"
    wait_for(lambda: (ckpts / "step_00000008" / "COMPLETE").exists(), proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = losses(tmp_path)
    resumed = train(args)
    latest = (ckpts / "latest").read_text()
    assert "resumed from" in resumed.stdout
    got = losses(tmp_path)
    for step, loss in uninterrupted.items():
        assert got[step] == loss, step
    for step, loss in before.items():  # steps run twice (after the checkpoint, before the kill) agree too
        assert loss == uninterrupted[step]
    assert latest == "step_00000030"
    kept = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_"))
    assert kept == ["step_00000028", "step_00000030"]  # keep_last=2 (28 = 7 x 4, then the final step)


@pytest.mark.parametrize("stage", [0, 2])  # our GuardedAdamW (fp32 ZeRO-0) and DeepSpeed's overflow check (ZeRO-2)
def test_nonfinite_steps_are_skipped_then_the_run_stops_with_last_good_state(shards, tmp_path, stage):
    args = overrides(shards, tmp_path, **{"deepspeed.zero_stage": stage, "train.max_steps": 10, "checkpoint.interval": 1,
                                          "checkpoint.keep_last": 10, "optim.warmup_steps": 10,
                                          "train.inject_nonfinite_grad_at": "[3]",  # finite loss, infinite gradients
                                          "train.inject_nonfinite_at": "[5,6,7]",  # NaN loss
                                          "train.max_consecutive_nonfinite": 3})
    proc = train(args, check=False)
    out = proc.stderr + proc.stdout
    assert proc.returncode != 0
    assert "step 3 skipped (non-finite gradient norm)" in out and "step 5 skipped (non-finite loss)" in out
    assert "3 consecutive steps with non-finite loss or gradients" in out
    assert "weights of the last good step (4)" in out
    recs = [r for r in records(tmp_path) if "skipped_steps" in r]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["skipped_steps"] for r in recs] == [0, 0, 1, 1, 2, 3, 4]
    assert [r["loss"] is None for r in recs] == [False, False, True, False, True, True, True]
    lr = [r["lr"] for r in recs]
    assert lr[2] == lr[1] < lr[3]  # a skipped step does not advance the warm-up either
    ckpts = tmp_path / "checkpoints"

    def weights(step):
        state = torch.load(ckpts / f"step_{step:08d}" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        return torch.cat([v.flatten() for v in state.values()])

    assert torch.equal(weights(2), weights(3))  # the bad-gradient step changed nothing
    assert not torch.equal(weights(3), weights(4))  # training went on
    assert torch.equal(weights(4), weights(7))  # nor did the three NaN-loss steps; saved at the stop
    client = torch.load(ckpts / "step_00000007" / "mp_rank_00_model_states.pt", weights_only=False)
    assert client["faults"] == {"consecutive": 3, "total": 4}
