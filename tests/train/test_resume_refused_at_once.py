"""What a resume refuses of its checkpoint at start (model settings, optim.no_decay_embeddings, the data
stream, the parallel layout) is named in one error: a large job learns in one start every setting to set
back, not one per start and queue wait. Nothing is written or converted."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainer_helpers import overrides, shards, train  # noqa: E402, F401


def tree_bytes(directory):
    """Every file below `directory` but the run's lock (each start rewrites it), with its bytes."""
    files = (p for p in sorted(directory.rglob("*")) if p.is_file() and p.name != "trainer.lock")
    return {str(p.relative_to(directory)): p.read_bytes() for p in files}


def test_every_refusal_of_a_resume_is_named_in_one_error(shards, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    train(overrides(shards, run, **{"train.max_steps": 2}), nproc=1)  # ZeRO 0, fp32
    saved = tree_bytes(run / "checkpoints")
    tag = run / "checkpoints" / "step_00000002"
    changed = {
        "train.max_steps": 4,
        "model.n_heads": 4,
        "optim.no_decay_embeddings": "false",
        "data.seed": 7,
        "deepspeed.zero_stage": 1,
        "deepspeed.precision": "bf16",
    }
    proc = train(overrides(shards, run, **changed), nproc=1, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    message = errors[0]
    assert message.startswith(f"error: train.resume: {tag} cannot be resumed with this config, for 4 reasons"), message
    for needle in (
        "(model.n_heads: 2 -> 4)",
        "Resume with optim.no_decay_embeddings=True",
        "data.seed: 1234 -> 7",
        "Resume with deepspeed.zero_stage=0 and deepspeed.precision=fp32",
    ):
        assert message.count(needle) == 1, (needle, message)
    assert tree_bytes(run / "checkpoints") == saved  # nothing converted or written
