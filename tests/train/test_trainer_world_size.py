"""Resume on another world size (2 ranks -> 1 and 1 -> 2, gloo, fp32) under ZeRO 0-3, and the rules
of components/reshard.py (what is converted, what is refused)."""
import os

import pytest
import torch

from trainer_helpers import losses, overrides, records, shards, train  # noqa: F401 (shards: a fixture)

from retnet_train.checkpoint_io import _model_states_file
from retnet_train.components.reshard import UNIVERSAL, checkpoint_layout, convert_to_universal, plan

STEPS, AT = 4, 2  # train 4 steps, checkpoint at 2, resume and compare steps 3..4
LOSS_RTOL = 1e-5  # fp32; measured differences are ~1e-7 relative (reduction order of 1 vs 2 ranks)
MOMENT_RTOL = 1e-4  # ||m - m_ref|| / ||m_ref|| of Adam's exp_avg / exp_avg_sq at the last step
BETAS = (0.9, 0.98)  # configs/optim default


def run_args(shards, run_dir, stage, **extra):
    # warm-up over 3 steps then linear decay: the LR of steps 3 and 4 differs from a restarted schedule
    return overrides(shards, run_dir, **{"deepspeed.zero_stage": stage, "train.max_steps": STEPS,
                                         "checkpoint.interval": AT, "checkpoint.keep_last": 5,
                                         "optim.warmup_steps": 3, "optim.decay": "linear", **extra})


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """(stage, nproc) -> run dir of an uninterrupted run (checkpoints at steps 2 and 4), made once."""
    cache = {}

    def get(stage, nproc):
        if (stage, nproc) not in cache:
            run_dir = tmp_path_factory.mktemp(f"ref_z{stage}_w{nproc}")
            train(run_args(shards, run_dir, stage), nproc=nproc)
            cache[stage, nproc] = run_dir
        return cache[stage, nproc]

    return get


def tag_dir(run_dir, step):
    return run_dir / "checkpoints" / f"step_{step:08d}"


def file_stamps(directory):
    """Name -> (size, mtime) of the files DeepSpeed and we wrote (what a conversion must not touch)."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir() if p.is_file()}


def adam_moments(tag):
    """{"exp_avg": flat, "exp_avg_sq": flat} over all parameters, from any ZeRO stage and world size."""
    if list(tag.glob("*zero_pp_rank_*_optim_states.pt")):  # ZeRO 1-3: DeepSpeed's universal format
        zero = os.path.join(convert_to_universal(str(tag)), "zero")
        names = sorted(n for n in os.listdir(zero) if os.path.isdir(os.path.join(zero, n)))

        def flat(name, key):
            t = torch.load(os.path.join(zero, name, f"{key}.pt"), weights_only=False)
            return (t["param"] if isinstance(t, dict) else t).flatten().double()

        return {k: torch.cat([flat(n, k) for n in names]) for k in ("exp_avg", "exp_avg_sq")}
    # ZeRO 0: the whole torch AdamW state sits in the model states
    state = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)["optimizer"]["state"]
    return {k: torch.cat([state[i][k].flatten().double() for i in sorted(state)]) for k in ("exp_avg", "exp_avg_sq")}


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.slow
@pytest.mark.parametrize("saved,resumed", [(2, 1), (1, 2)], ids=["2to1", "1to2"])
# ZeRO 2 shares ZeRO 1's optimizer class, checkpoint files and universal conversion; it is resumed
# (from ZeRO 1, across world sizes) in test_universal_copy_is_reused_and_zero_1_to_2_changes.
@pytest.mark.parametrize("stage", [0, 1, 3])
def test_resume_on_another_world_size_continues_the_run(shards, reference, tmp_path, stage, saved, resumed):
    ref = reference(stage, saved)
    source = tag_dir(ref, AT)
    stale = source / ".universal.tmp-deadhost-1" / UNIVERSAL  # an interrupted conversion: must be ignored
    stale.mkdir(parents=True, exist_ok=True)
    (stale / "garbage").write_text("x")
    before = file_stamps(source)
    # the layout is our own record in the client state, not the fallback to DeepSpeed's keys
    client = torch.load(_model_states_file(str(source)), map_location="cpu", weights_only=False)  # ZeRO-3 names it differently
    assert client["layout"] == {"world_size": saved, "zero_stage": stage, "precision": "fp32"}

    proc = train(run_args(shards, tmp_path, stage, **{"train.resume": str(source)}), nproc=resumed)
    out = proc.stdout
    assert f"at step {AT}" in out and f"world size {saved} -> {resumed}" in out, out[-3000:]
    assert file_stamps(source) == before  # the original checkpoint is untouched
    if stage == 0:  # unpartitioned optimizer state: loaded as is
        assert "converting" not in out and not (source / UNIVERSAL).exists()
    else:
        assert "converting to a universal checkpoint" in out
        assert (source / UNIVERSAL / "zero").is_dir()
    if resumed > saved:
        assert f"has RNG states for {saved} of this run's {resumed} ranks" in out

    want, got = losses(ref), losses(tmp_path)
    assert sorted(got) == list(range(AT + 1, STEPS + 1))
    for step in got:
        assert abs(got[step] - want[step]) <= LOSS_RTOL * abs(want[step]), (step, got[step], want[step])
    ref_recs = {r["step"]: r for r in records(ref) if "lr" in r}
    for r in records(tmp_path):
        if "lr" in r:  # the LR schedule and token count went on, not restarted
            assert r["lr"] == pytest.approx(ref_recs[r["step"]]["lr"], rel=1e-12)
            assert r["tokens_seen"] == ref_recs[r["step"]]["tokens_seen"]

    # Adam's moments were restored, not restarted: compare them after the last step, and check the
    # comparison would see fresh moments (they would lack beta^2 * the moments at the checkpoint).
    final, final_ref, at_ckpt = adam_moments(tag_dir(tmp_path, STEPS)), adam_moments(tag_dir(ref, STEPS)), adam_moments(source)
    for key, beta in zip(("exp_avg", "exp_avg_sq"), BETAS):
        assert rel(final[key], final_ref[key]) <= MOMENT_RTOL, key
        assert (beta ** 2) * at_ckpt[key].norm() / final_ref[key].norm() > 1000 * MOMENT_RTOL, key


@pytest.mark.slow
def test_universal_copy_is_reused_and_zero_1_to_2_changes(shards, reference, tmp_path):
    """ZeRO 1 on 2 ranks -> ZeRO 2 on 1 rank: one conversion serves a later resume too."""
    source = tag_dir(reference(1, 2), AT)
    convert_to_universal(str(source))
    proc = train(run_args(shards, tmp_path, 2, **{"train.resume": str(source)}), nproc=1)
    assert "using its universal copy" in proc.stdout and "ZeRO stage 1 -> 2" in proc.stdout
    want, got = losses(reference(1, 2)), losses(tmp_path)
    for step in got:
        assert abs(got[step] - want[step]) <= LOSS_RTOL * abs(want[step]), step


@pytest.mark.slow
@pytest.mark.parametrize("change,key", [({"deepspeed.zero_stage": 3}, "deepspeed.zero_stage"),
                                        ({"deepspeed.precision": "bf16"}, "deepspeed.precision")])
def test_what_cannot_be_resumed_is_refused_naming_path_and_key(shards, reference, tmp_path, change, key):
    source = tag_dir(reference(1, 2), AT)
    args = run_args(shards, tmp_path, 1, **{"train.resume": str(source), **change})
    proc = train(args, nproc=1, check=False)
    assert proc.returncode != 0
    assert str(source) in proc.stderr and f"{key}=" in proc.stderr, proc.stderr[-3000:]


# ---- the rules, without training ----------------------------------------------------------------

def fake_checkpoint(tmp_path, name="step_00000002", **layout):
    tag = tmp_path / name
    tag.mkdir()
    torch.save({"module": {}, "layout": layout}, tag / "mp_rank_00_model_states.pt")
    return tag


def L(world, stage, precision="fp32"):
    return {"world_size": world, "zero_stage": stage, "precision": precision}


@pytest.mark.parametrize("saved,current,universal", [
    (L(2, 0), L(1, 0), False),  # ZeRO 0: full optimizer state, any world size
    (L(2, 1), L(2, 1), False),  # same layout: DeepSpeed's own shards
    (L(2, 1), L(1, 1), True),
    (L(1, 3), L(4, 3), True),
    (L(2, 1), L(2, 2), True),  # ZeRO 1 <-> 2
    (L(2, 2, "bf16"), L(2, 2, "fp32"), False),  # precision at the same layout: DeepSpeed's business, as before
])
def test_plan(tmp_path, saved, current, universal):
    tag = fake_checkpoint(tmp_path, **saved)
    p = plan(str(tmp_path), tag.name, current)
    assert p.universal is universal
    assert p.load_args == ((str(tag), UNIVERSAL) if universal else (str(tmp_path), tag.name))


@pytest.mark.parametrize("saved,current,key", [
    (L(2, 0), L(2, 1), "deepspeed.zero_stage=0"),
    (L(2, 1), L(2, 3), "deepspeed.zero_stage=1"),
    (L(2, 3), L(1, 2), "deepspeed.zero_stage=3"),
    (L(2, 1, "bf16"), L(1, 1, "fp32"), "deepspeed.precision=bf16"),
    (L(2, 0, "fp32"), L(2, 0, "bf16"), "deepspeed.precision=fp32"),
])
def test_plan_refuses(tmp_path, saved, current, key):
    tag = fake_checkpoint(tmp_path, **saved)
    with pytest.raises(ValueError) as e:
        plan(str(tmp_path), tag.name, current)
    assert str(tag) in str(e.value) and key in str(e.value)


def test_layout_of_a_checkpoint_without_ours_comes_from_deepspeed(tmp_path):
    tag = tmp_path / "step_00000001"
    tag.mkdir()
    torch.save({"module": {}, "dp_world_size": 4, "mp_world_size": 1,
                "ds_config": {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}},
               tag / "mp_rank_00_model_states.pt")
    assert checkpoint_layout(str(tag)) == L(4, 2, "bf16")
