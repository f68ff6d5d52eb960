"""DeepSpeed checkpoints plus our client state, written so that a half-written one is never used.

Layout: <dir>/<tag>/ holds DeepSpeed's files (model/optimizer shards of every rank), our
rng_rank<r>.pt and, written by rank 0 only after every rank finished, COMPLETE. Then <dir>/latest
(the tag, DeepSpeed's own pointer format, so its zero_to_fp32 tools work) is replaced atomically.

Client state (stored by DeepSpeed beside the weights): one entry per stateful part of the trainer
(`train_state`, `data_loader`: each part's state_dict) plus facts that are read back but restore
nothing (`config`: the resolved config; `layout`: world size, ZeRO stage, precision; `tokenizer`: the
identity of data.tokenizer, loaders.tokenizer_record).
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Callable, List, Mapping, Optional, Protocol, TypeVar

import torch
import torch.distributed as dist

from . import checkpoint_discovery as discovery
from .checkpoint_discovery import TAG_RE, tag_step
from .checkpoint_guard import not_ours, refuse_foreign_tags
from .distributed import agreed_on_every_rank, on_every_rank
from .rank_errors import SharedError
from .rng import load_rng_state, rng_state, seed_everything

T = TypeVar("T")


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: Mapping) -> None: ...


def client_state(parts: Mapping[str, Stateful], **facts) -> dict:
    """What a checkpoint stores besides DeepSpeed's own state: each part's state_dict under its name."""
    return {**{name: part.state_dict() for name, part in parts.items()}, **facts}


def upgrade_client_state(client: dict) -> dict:
    """Checkpoints written before the client state held one entry per part kept the trainer's counters
    as flat keys (step, tokens_seen, wandb_id, faults) and the data loader's state under `data`."""
    if "train_state" in client or "step" not in client:
        return client
    flat = dict(client)
    train_state = {key: flat.pop(key) for key in ("step", "tokens_seen", "wandb_id", "faults") if key in flat}
    data_loader = flat.pop("data", None)
    return {**flat, "train_state": train_state, **({} if data_loader is None else {"data_loader": data_loader})}


def load_parts(client: Mapping, parts: Mapping[str, Stateful], origin: str) -> None:
    """Restore each part from its entry of a checkpoint's client state."""
    _refuse_missing_parts(client, parts, origin)
    for name, part in parts.items():
        try:
            part.load_state_dict(client[name])
        except ValueError as e:
            raise ValueError(f"train.resume: {origin}: {name}: {e}") from None


def check_parts(source: Optional[tuple], parts: Mapping[str, Stateful], refused: Optional[list] = None):
    """What load_parts would refuse of checkpoint `source` ((directory, tag); None: no resume), raised before
    the resume converts the checkpoint for another layout or writes anything, or added to `refused` (the resume
    plan names them with its own in one error). A part checks its entry only where it has a check_state (the
    data loader: another data stream). Returns the model states read (for the plan), None without a checkpoint."""
    if source is None:
        return None
    path = os.path.join(*source)
    try:
        state = discovery.read_model_states(path)
    except ValueError as e:  # a file damaged where the checks before choosing it do not look: named
        raise ValueError(f"train.resume: {e}") from e
    client = upgrade_client_state(state)  # DeepSpeed keeps the client state's keys beside its own
    _refuse_missing_parts(client, parts, path)
    for name, part in parts.items():
        try:
            getattr(part, "check_state", lambda _: None)(client[name])
        except ValueError as e:
            if refused is None:
                raise ValueError(f"train.resume: {path}: {name}: {e}") from None
            refused.append(f"train.resume: {path}: {name}: {e}")
    return state


def _refuse_missing_parts(client: Mapping, parts: Mapping[str, Stateful], origin: str) -> None:
    missing = [name for name in parts if name not in client]
    if missing:
        raise ValueError(
            f"train.resume: {origin} holds no {' / '.join(missing)} state (client state keys: "
            f"{sorted(k for k in client if isinstance(k, str))[:20]}): not a checkpoint of this trainer"
        )


def agreed_parts(source: Optional[tuple], parts: Mapping[str, Stateful], world: int) -> tuple:
    """check_parts on every rank (a collective): (the model states read, what it refused: the plan raises it)."""
    what, refused = f"reading the checkpoint {os.path.join(*source) if source else None} to resume", []
    return agreed_on_every_rank(lambda: check_parts(source, parts, refused), world, what), refused


def _failure_detail(tag_dir: str, error: Exception) -> str:
    """What went wrong in a save, in one line: the OS's reason with its file, or the exception. torch.save
    reports a write that failed (a full disk, a quota) as a RuntimeError of its zip writer ('unexpected pos 64
    vs 0') without the OS's reason: its first line, with the space left on the filesystem."""
    if isinstance(error, RuntimeError):
        try:
            free = f"{shutil.disk_usage(os.path.dirname(tag_dir)).free / 2**30:.2f} GiB free on its filesystem"
        except OSError:
            free = "free space unknown"
        return f"{(str(error).strip().splitlines() or [type(error).__name__])[0]}; {free}"
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    return f"{type(error).__name__}: {error}"


def _on_every_rank(tag_dir: str, work: Callable[[], T]) -> List[T]:
    """work(), a part of saving checkpoint `tag_dir`, on every rank (distributed.on_every_rank): what fails on
    some ranks stops every rank with one OSError naming the checkpoint, those ranks and why (SaveFailed), which
    the trainer reports as the I/O error it is (faults.io_failure), printed once. Alone, a rank raises as it is,
    torch's write failure as such an OSError."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        try:
            return [work()]
        except RuntimeError as e:
            raise OSError(None, f"saving the checkpoint failed ({_failure_detail(tag_dir, e)})", tag_dir) from e
    return on_every_rank(
        work,
        world,
        lambda e: _failure_detail(tag_dir, e),
        lambda failed: SaveFailed(None, f"saving the checkpoint failed on {failed}", tag_dir),
    )


class SaveFailed(SharedError, OSError):
    """A save that failed on some ranks, raised on every rank alike: rank 0 alone prints it."""


def _barrier():
    if dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    def __init__(self, directory: str, keep_last: int, rank: int):
        self.dir, self.keep_last, self.rank = directory, keep_last, rank

    tag_for = staticmethod(discovery.tag_for)

    def is_complete(self, tag: str) -> bool:
        return discovery.is_complete(self.dir, tag)

    def complete_tags(self) -> list:
        return discovery.complete_tags(self.dir)

    def latest_valid(self) -> Optional[str]:
        return discovery.latest_valid(self.dir)

    def save(self, engine, step: int, client_state: dict) -> str:
        """Every rank's files, then (rank 0) COMPLETE, `latest` and pruning, each part a collective step: what
        fails on any rank stops every rank with the same error (_on_every_rank)."""
        tag = self.tag_for(step)
        tag_dir = os.path.join(self.dir, tag)
        _on_every_rank(tag_dir, lambda: self._clear(tag_dir, step))
        # every rank's shards and RNG are on disk; each rank names what it sees (its own files at least:
        # a shared filesystem may show the others' late), and COMPLETE lists them all
        everyone = _on_every_rank(tag_dir, lambda: self._write(engine, tag, client_state))
        _on_every_rank(tag_dir, lambda: self._commit(tag, {n for names in everyone for n in names}))
        return tag_dir

    def _clear(self, tag_dir: str, step: int) -> None:
        if self.rank == 0 and os.path.lexists(tag_dir):
            # an earlier save of this step (damaged or interrupted, and passed over when this run resumed
            # from an older one): its marker and files must not mix with this save's
            refuse_foreign_tags(self.dir, [os.path.basename(tag_dir)])
            print(f"{tag_dir}: replacing an earlier save of step {step}", flush=True)
            shutil.rmtree(tag_dir)

    def _write(self, engine, tag: str, client_state: dict) -> list:
        """This rank's files of checkpoint `tag`; returns the files it sees there."""
        tag_dir = os.path.join(self.dir, tag)
        try:
            engine.save_checkpoint(self.dir, tag=tag, client_state=client_state, save_latest=False)
        except Exception:
            # DeepSpeed's save ends in a barrier, after its files (no collective among them): the ranks whose
            # writes went through wait there for this one before every rank learns what failed
            _barrier()
            raise
        torch.save(rng_state(), os.path.join(tag_dir, f"rng_rank{self.rank}.pt"))
        return [name for name in os.listdir(tag_dir) if os.path.isfile(os.path.join(tag_dir, name))]

    def _commit(self, tag: str, files: set) -> None:
        """Rank 0: COMPLETE, then `latest`, then pruning, each only once what came before is checked: the save read
        back as a resume would choose it (checkpoint_discovery.damage) and `latest` naming it. A save that
        fails the check deletes nothing: the checkpoints before it may be the last whole ones."""
        if self.rank != 0:
            return
        tag_dir = os.path.join(self.dir, tag)
        discovery.mark_complete(tag_dir, files)
        why = discovery.damage(self.dir, tag)
        if why is None:
            discovery.write_latest(self.dir, tag)
            if discovery.read_latest(self.dir) != tag:
                why = f"{discovery.LATEST} names {discovery.read_latest(self.dir)}, not {tag}"
        if why is None:
            self._prune(keep=tag)
        else:
            kept = "nothing is pruned, the checkpoints older than it are kept"
            print(f"warning: {tag_dir} fails its check after saving ({why}): {kept}", file=sys.stderr, flush=True)

    def _prune(self, keep: str) -> None:
        # keep_last counts the usable checkpoints up to this save. Complete ones of later steps are damaged
        # saves this run resumed past (resolve_resume refuses going back over valid ones): left as they are
        # until a save of that step replaces them. A damaged one below this save counts for nothing (else it
        # would push the last usable ones out) and stays until the kept window has moved past its step.
        step = tag_step(keep)
        kept = {keep}
        for tag in reversed([t for t in self.complete_tags() if tag_step(t) < step]):  # newest first, checked
            if len(kept) == self.keep_last:  # as far as needed (each check reads every shard's index)
                break
            if discovery.damage(self.dir, tag) is None:
                kept.add(tag)
        oldest_kept = min(tag_step(t) for t in kept)
        for tag in os.listdir(self.dir):
            if not TAG_RE.match(tag) or tag in kept or not_ours(self.dir, tag):
                continue  # (another program's step_<N> appeared while this run trained: not ours to delete)
            if not self.is_complete(tag) or tag_step(tag) < oldest_kept:  # never completed, or out of the window
                shutil.rmtree(os.path.join(self.dir, tag), ignore_errors=True)

    def existing(self) -> list:
        """Every checkpoint directory here, complete or not (what a fresh run would clobber)."""
        return discovery.checkpoint_tags(self.dir)

    def load(self, engine, tag: str, directory: Optional[str] = None, plan=None, reseed: Optional[int] = None) -> dict:
        """Load <directory or self.dir>/<tag>; later saves still go to self.dir.

        plan (components.reshard.ResumePlan): where DeepSpeed's files are read from when the
        checkpoint was converted for another world size / ZeRO stage (the engine must then have
        been built with checkpoint.load_universal). RNG: rank r restores rng_rank<r>.pt; a rank
        the checkpoint has no file for (resuming on more ranks than saved) re-seeds with
        reseed + rank + 1_000_003 * step (distinct from every rank's initial seed), said once by rank 0.
        Returns the client state, in today's layout also when the checkpoint is older (upgrade_client_state).
        """
        directory = directory or self.dir
        path = os.path.join(directory, tag)
        if not discovery.is_complete(directory, tag):
            raise ValueError(f"train.resume: {path} is not a complete checkpoint (no COMPLETE marker)")
        load_dir, load_tag = plan.load_args if plan is not None else (directory, tag)
        _, client_state = engine.load_checkpoint(load_dir, tag=load_tag)
        if client_state is None:
            raise ValueError(f"train.resume: DeepSpeed could not load {os.path.join(load_dir, load_tag)}")
        client_state = upgrade_client_state(client_state)
        if plan is not None and plan.universal:
            from .reshard import repair_universal_load

            repair_universal_load(engine, plan)
        rng_file = os.path.join(path, f"rng_rank{self.rank}.pt")
        if os.path.isfile(rng_file):
            load_rng_state(torch.load(rng_file, weights_only=False))
        elif reseed is not None:  # absent when resuming on more ranks than were saved
            step = int(client_state.get("train_state", {}).get("step", 0))
            seed_everything(reseed + self.rank + 1_000_003 * step)
        world = dist.get_world_size() if dist.is_initialized() else 1
        saved = sum(os.path.isfile(os.path.join(path, f"rng_rank{r}.pt")) for r in range(world))
        if self.rank == 0 and saved < world:
            print(
                f"{path} has RNG states for {saved} of this run's {world} ranks: ranks without one "
                + ("re-seed from train.seed, rank and step" if reseed is not None else "keep their fresh seeds"),
                flush=True,
            )
        return client_state


def load_initial_weights(model, path: str) -> None:
    """train.init_weights: a fresh run starts from an export's or a checkpoint's weights; what does not
    fit the model config is refused naming the path and the key."""
    from ..inference.errors import CheckpointError
    from ..inference.load import load_weights, read_weights

    try:
        load_weights(model, read_weights(path)[1], path)
    except CheckpointError as e:
        raise ValueError(f"train.init_weights: {e}") from None
