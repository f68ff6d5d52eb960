"""A resume that would put parameters into other weight-decay groups than the checkpoint's optimizer
state was saved with is refused before anything loads, naming the key."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainer_helpers import overrides, shards, train  # noqa: E402, F401


def test_a_resume_with_another_no_decay_embeddings_is_refused_naming_it(shards, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    train(overrides(shards, run, **{"train.max_steps": 2}), nproc=1)
    saved = sorted(p.name for p in (run / "checkpoints").iterdir())
    changed = {"train.max_steps": 4, "optim.no_decay_embeddings": "false"}
    proc = train(overrides(shards, run, **changed), nproc=1, check=False)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "optim.no_decay_embeddings=True, this run has False" in errors[0], proc.stderr[-2000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == saved  # nothing written
