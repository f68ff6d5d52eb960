"""What a checkpoint dir must not hold for the trainer to save there: every save replaces `latest` and
prunes step_<N> directories, so a directory holding another program's (or another run's) is refused at
start, before anything is written, rather than having them deleted or overwritten."""

from __future__ import annotations

import os
import re
from typing import Optional

from . import checkpoint_discovery as discovery

# what a save writes into <dir>/step_<N>/ before its COMPLETE marker: DeepSpeed's shards, our RNG states
SAVE_FILE_RE = re.compile(r"^(rng_rank\d+\.pt|.*mp_rank_\d+_(model|optim)_states\.pt|COMPLETE\.tmp)$")


def not_ours(directory: str, tag: str) -> Optional[str]:
    """Why <directory>/<tag> is not this trainer's to delete (None: a checkpoint, or a save of it that never
    completed). Without a COMPLETE marker, a directory holding anything a save does not write is another
    program's (another trainer's step_1000/, a user's outputs)."""
    tag_dir = os.path.join(directory, tag)
    if discovery.is_complete(directory, tag):
        return None
    if not os.path.isdir(tag_dir):
        return "it is not a directory"
    for name in sorted(os.listdir(tag_dir)):
        if not (SAVE_FILE_RE.match(name) and os.path.isfile(os.path.join(tag_dir, name))):
            return f"{name} in it is no file a save writes"
    return None


def refuse_foreign_tags(directory: str, tags: Optional[list] = None) -> None:
    """Refuse `tags` of `directory` (default: every step_<N> there) that this trainer did not write: at
    start, before anything is written, and before a save replaces an earlier one of its step."""
    tags = discovery.checkpoint_tags(directory) if tags is None else tags
    foreign = [(tag, why) for tag in tags if (why := not_ours(directory, tag))]
    if foreign:
        raise ValueError(
            f"checkpoint.dir={directory} holds {', '.join(t for t, _ in foreign[:3])}, which this trainer did "
            f"not write ({foreign[0][1]}; no {discovery.COMPLETE} marker): its saves would prune or replace them. "
            f"Give this run a checkpoint.dir of its own, or move them away (a checkpoint written elsewhere that "
            f"you know is whole: `touch {discovery.COMPLETE}` in it)"
        )


def refuse_a_run_dir(directory: str) -> None:
    """checkpoint.dir naming a run dir, whose checkpoints are in its checkpoints/: the run would start fresh
    beside them (train.resume=<run dir> finds them there; checkpoint.dir is where this run saves)."""
    nested = os.path.join(directory, "checkpoints")
    if not discovery.checkpoint_tags(directory) and discovery.checkpoint_tags(nested):
        raise ValueError(
            f"checkpoint.dir={directory} is a run directory: its checkpoints are in {nested}. "
            f"checkpoint.dir={nested} continues that run; train.resume={directory} starts from its newest "
            "checkpoint in a run.dir of your own"
        )


def refuse_foreign_latest(directory: str) -> None:
    """A `latest` that names no checkpoint this trainer can use (another DeepSpeed program's pointer, a
    user's symlink): the first save would replace it."""
    pointer = os.path.join(directory, discovery.LATEST)
    if not os.path.lexists(pointer):
        return
    if os.path.islink(pointer) or not os.path.isfile(pointer):
        why = "a symlink" if os.path.islink(pointer) else "not a file"
    else:
        tag = discovery.read_latest(directory)
        if tag is None or discovery.TAG_RE.match(tag):
            return  # this trainer's pointer (the step_<N> it names may be gone: pruned, moved)
        why = discovery.damage(directory, tag)  # another program's checkpoint, usable once marked whole
        if why is None:
            return
        why = f"it names {tag}: {why}"
    raise ValueError(
        f"checkpoint.dir={directory} holds a `latest` that this trainer did not write ({why}): its saves would "
        "replace it. Give this run a checkpoint.dir of its own, or move it away"
    )


def refuse_foreign(directory: str) -> None:
    """Everything above, for the checkpoint dir a run saves into."""
    refuse_foreign_tags(directory)
    refuse_a_run_dir(directory)
    refuse_foreign_latest(directory)
