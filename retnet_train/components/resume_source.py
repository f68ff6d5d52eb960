"""Which checkpoint a run resumes from, for train.resume = auto | never | a path, and what is refused first so
that a resume never clobbers data: a fresh start or a foreign checkpoint over this run's checkpoints, an older
checkpoint of this run while newer valid ones are there, a fresh start where every complete checkpoint is
damaged. agreed_resume asks every rank alike (a collective)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from . import checkpoint_discovery as discovery
from .checkpoint_discovery import tag_step
from .checkpoint_guard import refuse_foreign
from .distributed import agreed_on_every_rank
from .run_dir import continues_run, same_path

if TYPE_CHECKING:
    from .checkpoint import CheckpointManager


def resolve_resume(resume: str, manager: "CheckpointManager", config: Optional[dict] = None):
    """(directory, tag) to load, or None to start fresh, for train.resume = auto | never | a path.

    A path may name one checkpoint (<dir>/step_N) or a directory holding them (its newest valid
    one is taken: a run's checkpoints/ or the run dir itself; checkpoint_discovery says which is valid
    and rank 0 prints which newer ones were skipped). Refuses what would clobber data: a fresh start
    or a foreign checkpoint while our own checkpoint dir already holds checkpoints, an older checkpoint
    of our own while newer valid ones are there, and a fresh start where every complete checkpoint is
    damaged. A run started with a path that has saved checkpoints of its own continues from its newest
    one when the same command runs again (a requeue after preemption); so does a train.resume=never run
    whose newest checkpoint holds this very config (`config`: this run's resolved config; None: never
    continues).
    """
    refuse_foreign(manager.dir)  # before anything is written: what its saves would prune or replace
    ours = manager.existing()
    if resume == "auto":
        choice = discovery.choose(manager.dir)
        if choice.tag is None and manager.complete_tags():
            raise ValueError(
                f"train.resume=auto: no checkpoint in {manager.dir} can be resumed ({choice.reasons()}); "
                "move the damaged ones away, or pass train.resume=<an older checkpoint>"
            )
        return _chosen(choice, manager.rank)
    if resume == "never":
        own = discovery.choose(manager.dir) if ours else None
        if own is not None and own.tag is not None and config is not None and _saved_config(own.path) == config:
            # saved by this same command (a requeue after preemption, a restart after a crash), which exited
            # 75 saying the same command resumes: the run goes on; any other config is refused below
            if manager.rank == 0:
                print(f"train.resume=never: {own.path} was saved by this same run: continuing from it", flush=True)
            return _chosen(own, manager.rank)
        if ours:
            raise ValueError(
                f"train.resume=never but {manager.dir} already holds checkpoints ({', '.join(ours[-3:])}); "
                "new ones would overwrite and prune them. Use a new run.dir (or checkpoint.dir), "
                "or train.resume=auto to continue that run"
            )
        return None
    own = discovery.choose(manager.dir) if ours else None
    if own is not None and own.tag is not None and same_path(_saved_resume(own.path), resume):
        # this same command saved it (a requeue after preemption, a restart after a crash): the run goes on
        # from its own newest checkpoint, as the refusals below would otherwise stop the same command
        if manager.rank == 0:
            print(f"train.resume={resume}: {own.path} was saved by this same run: continuing from it", flush=True)
        return _chosen(own, manager.rank)
    choice = discovery.find_checkpoint(resume)
    if choice.tag is None:
        raise ValueError(
            f"train.resume={resume}: no complete checkpoint there ({choice.reasons()}; expected "
            "<dir>/step_N with a COMPLETE marker, or a directory holding such checkpoints)"
        )
    if ours and not continues_run(manager.dir, choice.directory):
        raise ValueError(
            f"train.resume={resume}: this run's checkpoint dir {manager.dir} already holds checkpoints "
            f"({', '.join(ours[-3:])}); resuming from elsewhere would overwrite them. Use a new run.dir "
            "(or checkpoint.dir)"
        )
    newer = _newer_valid(manager.dir, choice.tag) if ours else []
    if newer:
        # Going back to an older checkpoint of this run would leave its newer ones in place, and a later
        # train.resume=auto (a requeue, a crash) would continue from those instead of from this run's saves.
        raise ValueError(
            f"train.resume={resume}: this run's checkpoint dir {manager.dir} holds newer checkpoints "
            f"({', '.join(newer[-3:])}) that a later train.resume=auto would continue from instead of this "
            f"run's saves. Move them out of {manager.dir}, or resume into a new run.dir (or checkpoint.dir)"
        )
    return _chosen(choice, manager.rank)


def agreed_resume(resume: str, manager: "CheckpointManager", config: dict, world: int):
    """resolve_resume on every rank (a collective): what it refuses (the checkpoint dir, the checkpoint) comes
    from files every rank reads alike, so with several ranks every rank raises it (naming the ranks where they
    differ), printed by rank 0 alone (distributed.agreed_on_every_rank); any other failure names the ranks it met."""
    what = f"checking checkpoint.dir={manager.dir} and train.resume={resume}"
    return agreed_on_every_rank(lambda: resolve_resume(resume, manager, config), world, what)


def _saved_config(tag_dir: str) -> Optional[dict]:
    """The resolved config of the run that saved checkpoint `tag_dir` (None where it does not say)."""
    try:
        state = discovery.read_model_states(tag_dir)
    except (OSError, ValueError):
        return None
    config = state.get("config") if isinstance(state, dict) else None
    return config if isinstance(config, dict) else None


def _saved_resume(tag_dir: str) -> Optional[str]:
    """The train.resume of the run that saved checkpoint `tag_dir` (None where it does not say)."""
    train = (_saved_config(tag_dir) or {}).get("train")
    return train.get("resume") if isinstance(train, dict) else None


def _newer_valid(directory: str, tag: str) -> list:
    """The valid step_<N> checkpoints in `directory` newer than `tag` (none when tag is not a step_<N>)."""
    step = tag_step(tag)
    if step is None:
        return []
    newer = [t for t in discovery.complete_tags(directory) if tag_step(t) > step]
    return [t for t in newer if discovery.damage(directory, t) is None]


def _chosen(choice: "discovery.Choice", rank: int):
    if choice.tag is None:
        if rank == 0 and choice.skipped:  # (saves that never completed: a fresh start)
            print(f"no whole checkpoint in {choice.directory}; passed over: {choice.reasons()}", flush=True)
        return None
    if rank == 0 and choice.note():
        print(choice.note(), flush=True)
    return choice.directory, choice.tag
