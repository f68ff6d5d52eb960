"""Resume on another world size (2 ranks -> 1 and 1 -> 2, gloo, fp32) under ZeRO 0-3, and the rules
of components/reshard.py (what is converted, what is refused)."""

import os
from types import SimpleNamespace

import pytest
import torch
from trainer_helpers import losses, overrides, records, run_scenarios, shards  # noqa: F401 (shards: a fixture)

from retnet_train.components.checkpoint_discovery import model_states_file
from retnet_train.components.reshard import LOCK, UNIVERSAL, checkpoint_layout, convert_to_universal, plan

STEPS, AT = 4, 2  # train 4 steps, checkpoint at 2, resume and compare steps 3..4
LOSS_RTOL = 1e-5  # fp32; measured differences are ~1e-7 relative (reduction order of 1 vs 2 ranks)
MOMENT_RTOL = 1e-4  # ||m - m_ref|| / ||m_ref|| of Adam's exp_avg / exp_avg_sq at the last step
BETAS = (0.9, 0.98)  # OptimConfig default
# ZeRO 2 shares ZeRO 1's optimizer class, checkpoint files and universal conversion; it is resumed
# (from ZeRO 1, across world sizes) in test_universal_copy_is_reused_and_zero_1_to_2_changes.
STAGES = (0, 1, 3)
REFUSED = {"deepspeed.zero_stage": {"deepspeed.zero_stage": 3}, "deepspeed.precision": {"deepspeed.precision": "bf16"}}


def run_args(shards, run_dir, stage, **extra):
    # warm-up over 3 steps then linear decay: the LR of steps 3 and 4 differs from a restarted schedule
    return overrides(
        shards,
        run_dir,
        **{
            "deepspeed.zero_stage": stage,
            "train.max_steps": STEPS,
            "checkpoint.interval": AT,
            "checkpoint.keep_last": 5,
            "optim.warmup_steps": 3,
            "optim.decay": "linear",
            **extra,
        },
    )


def tag_dir(run_dir, step):
    return run_dir / "checkpoints" / f"step_{step:08d}"


def file_stamps(directory):
    """Name -> (size, mtime) of the files DeepSpeed and we wrote (what a conversion must not touch; its
    lock file is its own)."""
    return {
        p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir() if p.is_file() and p.name != LOCK
    }


def prepare_source(source):
    """Leave an interrupted conversion in the checkpoint (a resume must ignore it); returns the
    checkpoint's file stamps before the resume."""
    stale = source / ".universal.tmp-deadhost-1" / UNIVERSAL
    stale.mkdir(parents=True, exist_ok=True)
    (stale / "garbage").write_text("x")
    return file_stamps(source)


def tree_bytes(directory):
    """Relative path -> bytes of every file below `directory` (what a refused resume must leave as it was)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory):
    """Every trainer run of this module, in three launches (run_scenarios: the start-up of torch,
    DeepSpeed and torchrun once per launch, not once per run):
    1. 1 rank: uninterrupted runs (checkpoints at steps 2 and 4) under ZeRO 0, 1 and 3;
    2. 2 ranks: the same runs, then the resumes of launch 1's step-2 checkpoints;
    3. 1 rank: the resumes of launch 2's step-2 checkpoints, then the ZeRO 1 -> 2 resume (after the
       ZeRO-1 resume converted its checkpoint) and the refused resumes.
    Launch 2 also saves a 2-step ZeRO-1 run that launch 3 resumes with another data.seq_len (refused).
    ref[stage, world] -> run dir; resumed[stage, saved, resumed] -> (run dir, Outcome, the source's
    file stamps before); z1_to_z2 -> (run dir, Outcome); refused[key] -> Outcome; data_change -> (the
    saved run dir, its tree_bytes before launch 3, the refused resume's Outcome)."""
    root = tmp_path_factory.mktemp("world_size")
    ref = {(stage, world): root / f"ref_z{stage}_w{world}" for stage in STAGES for world in (1, 2)}
    before = {}

    def fresh(stage, world):
        return ref[stage, world].name, run_args(shards, ref[stage, world], stage)

    def resume(stage, saved, world):
        source = tag_dir(ref[stage, saved], AT)
        before[stage, saved, world] = prepare_source(source)
        name = f"z{stage}_{saved}to{world}"
        return name, run_args(shards, root / name, stage, **{"train.resume": str(source)})

    outcomes = run_scenarios([fresh(s, 1) for s in STAGES], nproc=1, workdir=root / "launch1")
    saved = root / "data_change_saved"
    outcomes |= run_scenarios(
        [fresh(s, 2) for s in STAGES]
        + [resume(s, 1, 2) for s in STAGES]
        + [(saved.name, run_args(shards, saved, 1, **{"train.max_steps": AT}))],
        nproc=2,
        workdir=root / "launch2",
    )
    saved_before = tree_bytes(saved)
    z1_source = str(tag_dir(ref[1, 2], AT))
    last = [resume(s, 2, 1) for s in STAGES]
    last.append(("z1_to_z2", run_args(shards, root / "z1_to_z2", 2, **{"train.resume": z1_source})))
    last += [
        (
            f"refused_{key}",
            run_args(shards, root / f"refused_{key}", 1, **{"train.resume": z1_source, **change}),
            "ValueError",
        )
        for key, change in REFUSED.items()
    ]
    data_change = {"train.resume": str(tag_dir(saved, AT)), "data.seq_len": 32}
    last.append(("refused_data_change", run_args(shards, root / "refused_data_change", 1, **data_change), "ValueError"))
    outcomes |= run_scenarios(last, nproc=1, workdir=root / "launch3")

    resumed = {
        key: (root / f"z{key[0]}_{key[1]}to{key[2]}", outcomes[f"z{key[0]}_{key[1]}to{key[2]}"], stamps)
        for key, stamps in before.items()
    }
    return SimpleNamespace(
        ref=ref,
        resumed=resumed,
        z1_to_z2=(root / "z1_to_z2", outcomes["z1_to_z2"]),
        refused={key: outcomes[f"refused_{key}"] for key in REFUSED},
        data_change=(saved, saved_before, outcomes["refused_data_change"]),
    )


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
@pytest.mark.parametrize("stage", STAGES)
def test_resume_on_another_world_size_continues_the_run(runs, stage, saved, resumed):
    ref = runs.ref[stage, saved]
    source = tag_dir(ref, AT)
    run_dir, outcome, before = runs.resumed[stage, saved, resumed]
    # the layout is our own record in the client state, not the fallback to DeepSpeed's keys
    client = torch.load(
        model_states_file(str(source)), map_location="cpu", weights_only=False
    )  # ZeRO-3 names it differently
    assert client["layout"] == {"world_size": saved, "zero_stage": stage, "precision": "fp32"}

    out = outcome.stdout
    assert f"at step {AT}" in out and f"world size {saved} -> {resumed}" in out, out[-3000:]
    assert file_stamps(source) == before  # the original checkpoint is untouched
    if stage == 0:  # unpartitioned optimizer state: loaded as is
        assert "converting" not in out and not (source / UNIVERSAL).exists()
    else:
        assert "converting to a universal checkpoint" in out
        assert (source / UNIVERSAL / "zero").is_dir()
    if resumed > saved:
        assert f"has RNG states for {saved} of this run's {resumed} ranks" in out

    want, got = losses(ref), losses(run_dir)
    assert sorted(got) == list(range(AT + 1, STEPS + 1))
    for step in got:
        assert abs(got[step] - want[step]) <= LOSS_RTOL * abs(want[step]), (step, got[step], want[step])
    ref_recs = {r["step"]: r for r in records(ref) if "lr" in r}
    for r in records(run_dir):
        if "lr" in r:  # the LR schedule and token count went on, not restarted
            assert r["lr"] == pytest.approx(ref_recs[r["step"]]["lr"], rel=1e-12)
            assert r["tokens_seen"] == ref_recs[r["step"]]["tokens_seen"]

    # Adam's moments were restored, not restarted: compare them after the last step, and check the
    # comparison would see fresh moments (they would lack beta^2 * the moments at the checkpoint).
    final, final_ref, at_ckpt = (
        adam_moments(tag_dir(run_dir, STEPS)),
        adam_moments(tag_dir(ref, STEPS)),
        adam_moments(source),
    )
    for key, beta in zip(("exp_avg", "exp_avg_sq"), BETAS):
        assert rel(final[key], final_ref[key]) <= MOMENT_RTOL, key
        assert (beta**2) * at_ckpt[key].norm() / final_ref[key].norm() > 1000 * MOMENT_RTOL, key


@pytest.mark.slow
def test_universal_copy_is_reused_and_zero_1_to_2_changes(runs):
    """ZeRO 1 on 2 ranks -> ZeRO 2 on 1 rank: the conversion made for the ZeRO-1 resume on 1 rank
    (the launch runs that one first) serves this resume too."""
    run_dir, outcome = runs.z1_to_z2
    assert "using its universal copy" in outcome.stdout and "ZeRO stage 1 -> 2" in outcome.stdout
    want, got = losses(runs.ref[1, 2]), losses(run_dir)
    assert sorted(got) == list(range(AT + 1, STEPS + 1))
    for step in got:
        assert abs(got[step] - want[step]) <= LOSS_RTOL * abs(want[step]), step


@pytest.mark.slow
@pytest.mark.parametrize("key", REFUSED)
def test_what_cannot_be_resumed_is_refused_naming_path_and_key(runs, key):
    # the ValueError the CLI prints (`error: ...`) before it exits with status 1
    outcome = runs.refused[key]
    source = tag_dir(runs.ref[1, 2], AT)
    assert outcome.error == "ValueError"
    assert str(source) in outcome.message and f"{key}=" in outcome.message, outcome.message


# ---- the rules, without training ----------------------------------------------------------------


def fake_checkpoint(tmp_path, name="step_00000002", **layout):
    tag = tmp_path / name
    tag.mkdir()
    torch.save({"module": {}, "layout": layout}, tag / "mp_rank_00_model_states.pt")
    return tag


def L(world, stage, precision="fp32"):
    return {"world_size": world, "zero_stage": stage, "precision": precision}


@pytest.mark.parametrize(
    "saved,current,universal",
    [
        (L(2, 0), L(1, 0), False),  # ZeRO 0: full optimizer state, any world size
        (L(2, 1), L(2, 1), False),  # same layout: DeepSpeed's own shards
        (L(2, 1), L(1, 1), True),
        (L(1, 3), L(4, 3), True),
        (L(2, 1), L(2, 2), True),  # ZeRO 1 <-> 2
        (L(2, 2, "fp16"), L(2, 2, "fp32"), False),  # precision at the same layout, same files: DeepSpeed's business
        (L(2, 1, "bf16-mixed"), L(2, 1, "fp32"), False),  # both keep fp32 weights and optimizer state
        (L(2, 0, "fp32"), L(1, 0, "bf16-mixed"), False),  # ... also at ZeRO 0 on another world size
        (L(2, 1, "bf16-mixed"), L(1, 1, "fp32"), True),  # ... and converted for another world size
    ],
)
def test_plan(tmp_path, saved, current, universal):
    tag = fake_checkpoint(tmp_path, **saved)
    p = plan(str(tmp_path), tag.name, current)
    assert p.universal is universal
    assert p.load_args == ((str(tag), UNIVERSAL) if universal else (str(tmp_path), tag.name))


@pytest.mark.parametrize(
    "saved,current,key",
    [
        (L(2, 0), L(2, 1), "deepspeed.zero_stage=0"),
        (L(2, 1), L(2, 3), "deepspeed.zero_stage=1"),
        (L(2, 3), L(1, 2), "deepspeed.zero_stage=3"),
        (L(2, 1, "bf16"), L(1, 1, "fp32"), "deepspeed.precision=bf16"),
        (L(2, 0, "fp32"), L(2, 0, "bf16"), "deepspeed.precision=fp32"),
        # DeepSpeed names a bf16 run's optimizer shards bf16_zero_pp_rank_*: another precision looks for files
        # that are not there
        (L(2, 1, "bf16"), L(2, 1, "fp32"), "deepspeed.precision=bf16"),
        (L(1, 2, "bf16-mixed"), L(1, 2, "bf16"), "deepspeed.precision=bf16-mixed"),
        (L(2, 3, "fp16"), L(2, 3, "bf16"), "deepspeed.precision=fp16"),
    ],
)
def test_plan_refuses(tmp_path, saved, current, key):
    tag = fake_checkpoint(tmp_path, **saved)
    with pytest.raises(ValueError) as e:
        plan(str(tmp_path), tag.name, current)
    assert str(tag) in str(e.value) and key in str(e.value)


@pytest.mark.parametrize(
    "saved,current,reason",
    [
        # bf16 <-> fp32 is refused at any world size: the world-size change is not what stops it
        (L(1, 1, "bf16"), L(2, 1, "fp32"), "between bf16 and another precision"),
        (L(2, 3, "fp32"), L(1, 3, "bf16"), "between bf16 and another precision"),
        (L(2, 0, "bf16"), L(1, 0, "fp32"), "at ZeRO 0"),
        # fp16 -> fp32 at the same layout loads (the same files): here the world-size change is the obstacle
        (L(2, 2, "fp16"), L(1, 2, "fp32"), "together with a world-size or ZeRO-stage change"),
    ],
)
def test_a_refused_precision_change_gives_the_reason_that_holds_at_any_world_size(tmp_path, saved, current, reason):
    """A reason that names the world-size change would send the user to retry on the saved world size, where
    the same precision change is refused again for another reason."""
    tag = fake_checkpoint(tmp_path, **saved)
    with pytest.raises(ValueError) as e:
        plan(str(tmp_path), tag.name, current)
    assert reason in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "saved,current,keys",
    [
        (L(2, 0, "bf16"), L(2, 1, "fp32"), ["deepspeed.zero_stage=0", "deepspeed.precision=bf16"]),
        (L(2, 1, "bf16"), L(1, 3, "fp32"), ["deepspeed.zero_stage=1", "deepspeed.precision=bf16"]),
        # at ZeRO 3 on 1 rank fp16 -> fp32 is a precision change with a world-size change: refused as well
        (L(2, 3, "fp16"), L(1, 1, "fp32"), ["deepspeed.zero_stage=3", "deepspeed.precision=fp16"]),
        # at ZeRO 3 on 2 ranks it loads: the stage alone is named
        (L(2, 3, "fp16"), L(2, 1, "fp32"), ["deepspeed.zero_stage=3"]),
    ],
)
def test_a_refused_layout_names_every_key_to_set_at_once(tmp_path, saved, current, keys):
    """A large job learns in one start what to change: the stage and the precision the checkpoint needs on
    this world size, not the stage first and the precision at the next start."""
    tag = fake_checkpoint(tmp_path, **saved)
    with pytest.raises(ValueError) as e:
        plan(str(tmp_path), tag.name, current)
    message = str(e.value)
    assert str(tag) in message
    remedy = message.split("Resume with ", 1)[1]  # what to set, after what changed and why
    assert [k for k in ("deepspeed.zero_stage=", "deepspeed.precision=") if k in remedy] == [
        k[: k.index("=") + 1] for k in keys
    ]
    assert all(key in remedy for key in keys), message


def test_layout_of_a_checkpoint_without_ours_comes_from_deepspeed(tmp_path):
    tag = tmp_path / "step_00000001"
    tag.mkdir()
    torch.save(
        {
            "module": {},
            "dp_world_size": 4,
            "mp_world_size": 1,
            "ds_config": {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}},
        },
        tag / "mp_rank_00_model_states.pt",
    )
    assert checkpoint_layout(str(tag)) == L(4, 2, "bf16")


@pytest.mark.slow
def test_a_refused_data_change_leaves_the_checkpoint_unconverted(runs):
    """A ZeRO-1 checkpoint of 2 ranks resumed on 1 rank with another data.seq_len: the loader refuses the
    data change before the checkpoint is converted for the new world size, so its directory stays as it was."""
    saved, before, refused = runs.data_change
    source = tag_dir(saved, AT)
    assert str(source) in refused.message and "data.seq_len: 64 -> 32" in refused.message
    assert "converting" not in refused.stdout
    assert not (source / UNIVERSAL).exists()
    assert tree_bytes(saved) == before
