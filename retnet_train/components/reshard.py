"""Resume a checkpoint written by another world size (or ZeRO stage): DeepSpeed's universal checkpoint.

Every checkpoint records its layout in the client state (`layout`: world_size, zero_stage,
precision; older checkpoints: DeepSpeed's own `dp_world_size` and `ds_config`). Before
deepspeed.initialize, `prepare_resume` compares it with this run:

* same layout: DeepSpeed's own shards are loaded as always (bitwise-exact resume);
* ZeRO 0 (no partitioned optimizer state: the full weights and optimizer state sit in
  mp_rank_00_model_states.pt) at another world size: loaded as is, nothing to convert;
* ZeRO 1-3 at another world size, or ZeRO 1 <-> 2: rank 0 converts the
  checkpoint once with `deepspeed.checkpoint.ds_to_universal` into <ckpt>/<tag>/universal
  (written to a temporary directory inside the tag dir, then renamed: an interrupted conversion
  is never used, the original files are never modified), every rank waits, and the engine is
  built with {"checkpoint": {"load_universal": true}} so each rank reads its slice of the fp32
  weights and Adam moments (exp_avg, exp_avg_sq, step) per parameter. The LR scheduler, step
  counters and our client state come from the copied mp_rank_* file; the data position is
  counted in global sequences, so it carries over too.
* what cannot be converted (a ZeRO stage change to or from 0 or 3, a precision change together
  with a world-size or stage change, at ZeRO 0, or between bf16 and another precision) is refused
  naming the checkpoint path and the config key to set.

Per-rank RNG: rank r restores rng_rank<r>.pt when the checkpoint has it; ranks beyond the old world
size re-seed (see CheckpointManager.load).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import shutil
import socket
import sys
import types
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ..interop.legacy import has_separate_projections
from .checkpoint_discovery import read_model_states
from .config import FP32_WEIGHTS
from .distributed import agreed_on_every_rank
from .rank_errors import SameOnEveryRank

UNIVERSAL = "universal"  # <dir>/<tag>/universal: the converted copy
TMP_PREFIX = ".universal.tmp-"
LOCK = ".universal.lock"  # held while converting: one conversion of a checkpoint at a time


def run_layout(cfg, world: int) -> dict:
    """What a checkpoint of this run depends on besides the model itself (stored as client["layout"])."""
    return {"world_size": world, "zero_stage": cfg.deepspeed.zero_stage, "precision": cfg.deepspeed.precision}


def stored_precision(precision: str) -> str:
    """The precision of what a checkpoint holds: bf16-mixed runs keep fp32 weights and optimizer state."""
    return "fp32" if precision in FP32_WEIGHTS else precision


def checkpoint_layout(tag_dir: str, state: Optional[dict] = None) -> dict:
    """The layout a checkpoint was written with: our client state's `layout`, else DeepSpeed's keys."""
    state = read_model_states(tag_dir) if state is None else state
    if isinstance(state.get("layout"), dict):
        return dict(state["layout"])
    ds = state.get("ds_config") or {}
    precision = "bf16" if ds.get("bf16", {}).get("enabled") else "fp16" if ds.get("fp16", {}).get("enabled") else "fp32"
    return {
        "world_size": int(state.get("dp_world_size", 1)) * int(state.get("mp_world_size", 1)),
        "zero_stage": int(ds.get("zero_optimization", {}).get("stage", 0)),
        "precision": precision,
    }


def refuse_separate_projections(path: str, state: dict) -> None:
    """Checkpoints from before the retention's q/k/v weights were stacked into one (qkv_proj)
    hold optimizer state for three tensors per layer where the model now has one."""
    names = list(state.get("module") or {}) + [n for group in state.get("param_shapes") or [] for n in group]
    if has_separate_projections(names):
        raise ValueError(
            f"train.resume: {path} was written with separate retention q/k/v_proj weights (retnet-train "
            "before qkv_proj); its optimizer state does not fit this model and cannot be resumed. Its weights "
            "still load for export, evaluation and generation (retnet_train.inference.export / evaluate / generate)"
        )


@dataclass
class ResumePlan:
    directory: str  # the checkpoint as resolve_resume named it: <directory>/<tag> (COMPLETE, RNG files)
    tag: str
    saved: dict  # layout it was written with
    current: dict  # this run's layout
    universal: bool = False  # load DeepSpeed's files from <directory>/<tag>/universal
    notes: list = field(default_factory=list)

    @property
    def path(self) -> str:
        return os.path.join(self.directory, self.tag)

    @property
    def load_args(self) -> tuple:
        """(load_dir, tag) for engine.load_checkpoint."""
        return (self.path, UNIVERSAL) if self.universal else (self.directory, self.tag)


def model_change_refusal(path: str, state: dict, model: dict) -> Optional[str]:
    """A resume under model settings that change what the weights compute (n_heads, norm_eps, ... with
    shapes that may still fit) would train another model from step N on: why it is refused, naming what
    changed (None: no such change)."""
    from ..model.config import function_changes

    saved = (state.get("config") or {}).get("model")
    if not isinstance(saved, dict):
        return None  # not written by this trainer: the weights' shapes are all there is to check
    try:
        changed = function_changes(saved, model)
    except ValueError:
        return None  # settings of another version of this code; the weights' load names any misfit
    if not changed:
        return None
    return (
        f"train.resume: {path} was trained with other model settings ({'; '.join(f'model.{c}' for c in changed)}): "
        "the weights would compute another function. Resume with the checkpoint's model settings; to start "
        f"a new run from these weights (where the shapes fit): a new run.dir with train.init_weights={path}"
    )


def decay_group_refusal(path: str, state: dict, no_decay_embeddings: bool) -> Optional[str]:
    """optim.no_decay_embeddings moves the embedding between the optimizer's two param groups, whose saved
    moments would not fit them (torch and DeepSpeed refuse that without naming the key): why it is refused."""
    saved = ((state.get("config") or {}).get("optim") or {}).get("no_decay_embeddings")
    if saved is None or bool(saved) == no_decay_embeddings:
        return None  # not written by this trainer, or unchanged
    return (
        f"train.resume: {path} was trained with optim.no_decay_embeddings={bool(saved)}, this run has "
        f"{no_decay_embeddings}: the optimizer state is saved per weight-decay group and does not fit other groups. "
        f"Resume with optim.no_decay_embeddings={bool(saved)}; to start a new run from these weights (fresh "
        f"optimizer state): a new run.dir with train.init_weights={path}"
    )


def not_writable(tag_dir: str) -> str:
    return (
        f"train.resume: {tag_dir} must be converted for this world size / ZeRO stage but is not "
        "writable; copy the checkpoint directory somewhere writable and resume from there"
    )


def plan(
    directory: str,
    tag: str,
    current: dict,
    model: Optional[dict] = None,
    state: Optional[dict] = None,
    no_decay_embeddings: Optional[bool] = None,
    refused: Sequence[str] = (),
) -> ResumePlan:
    """Decide how to load <directory>/<tag> into a run of layout `current` (and model settings `model`,
    optim.no_decay_embeddings, when given); raise ValueError if it cannot be, naming every reason at once
    with `refused` (what the caller's own checks refused: another data stream). `state`: its model_states,
    when the caller has read them."""
    path = os.path.join(directory, tag)
    state = read_model_states(path) if state is None else state
    refuse_separate_projections(path, state)  # not this model's format: nothing else to compare
    refusals = [
        model_change_refusal(path, state, model) if model is not None else None,
        decay_group_refusal(path, state, no_decay_embeddings) if no_decay_embeddings is not None else None,
        *refused,
    ]
    saved = checkpoint_layout(path, state)
    p = ResumePlan(directory, tag, saved, current)
    old_ws, new_ws = saved["world_size"], current["world_size"]
    old_z, new_z = saved["zero_stage"], current["zero_stage"]
    stage = _stage_refusal(old_z, new_z)
    # the precision is judged at the stage the run can resume with: every key to set is named in one error
    reshard = (old_z != new_z and not stage) or (old_z >= 1 and old_ws != new_ws)
    precision = _precision_refusal(saved["precision"], current["precision"], old_z, reshard)
    layout = [(key, why) for key, why in (("zero_stage", stage), ("precision", precision)) if why]
    if layout:
        refusals.append(
            f"train.resume: {path} was written with "
            + "; and with ".join(why for _, why in layout)
            + ". Resume with "
            + " and ".join(f"deepspeed.{key}={saved[key]}" for key, _ in layout)
            + ("; any world size works at the saved ZeRO stage, and only 1 <-> 2 can change on resume" if stage else "")
        )
    if old_ws != new_ws:
        p.notes.append(f"world size {old_ws} -> {new_ws}")
    if old_z != new_z:
        p.notes.append(f"ZeRO stage {old_z} -> {new_z}")
    p.universal = reshard
    if reshard and not os.path.isdir(os.path.join(path, UNIVERSAL)) and not os.access(path, os.W_OK):
        refusals.append(not_writable(path))
    refuse_at_once(path, [why for why in refusals if why])
    return p


def refuse_at_once(path: str, refusals: list) -> None:
    """Every refusal of a resume in one error (one alone as it is): a large job learns in one start, before
    anything is written or converted, every setting to set back, rather than one per queue wait."""
    if len(refusals) <= 1:
        if refusals:
            raise ValueError(refusals[0])
        return
    head = f"train.resume: {path}"
    whys = [why[len(head) :].lstrip(": ") if why.startswith(head) else why for why in refusals]
    whys = [f"it {why}" if why.startswith(("was ", "must ")) else why for why in whys]
    raise ValueError(
        f"{head} cannot be resumed with this config, for {len(whys)} reasons (the checkpoint is left as it is): "
        + " ".join(f"({n}) {why}." for n, why in enumerate(whys, 1))
    )


def _stage_refusal(old_z: int, new_z: int) -> Optional[str]:
    """Why a ZeRO stage change cannot be resumed (None: it can): any change but 1 <-> 2."""
    if old_z == new_z or {old_z, new_z} == {1, 2}:
        return None
    why = (
        "ZeRO 0 keeps its optimizer state unpartitioned, in another format"
        if 0 in (old_z, new_z)
        else "DeepSpeed 0.19.8's universal checkpoints of ZeRO 1/2 and of ZeRO 3 differ in file names, step and "
        "optimizer-state layout, so neither loads into the other"
    )
    return (
        f"deepspeed.zero_stage={old_z}, this run has deepspeed.zero_stage={new_z}: this change cannot be resumed "
        + f"({why})"
    )


def _precision_refusal(old: str, new: str, old_z: int, reshard: bool) -> Optional[str]:
    """Why a precision change cannot be resumed at ZeRO stage old_z (reshard: converted for another world size
    or stage); None: it can."""
    # DeepSpeed names a bf16 run's ZeRO 1-3 optimizer shards bf16_zero_pp_rank_*: another precision looks for
    # zero_pp_rank_* (and the other way round), which are not there
    shard_names = (old == "bf16") != (new == "bf16")
    if stored_precision(old) == stored_precision(new) or not (reshard or old_z == 0 or shard_names):
        return None
    why = (  # the reason that holds at any world size first: the saved one would be refused again
        "at ZeRO 0 (the optimizer state formats differ)"
        if old_z == 0
        else "between bf16 and another precision (DeepSpeed keeps bf16's optimizer state in other files)"
        if shard_names
        else "together with a world-size or ZeRO-stage change"
    )
    return f"deepspeed.precision={old}, this run has deepspeed.precision={new}: not supported {why}"


def convert_to_universal(tag_dir: str) -> str:
    """<tag_dir>/universal from DeepSpeed's shards in tag_dir (ZeRO 1-3), once; returns its path.

    Written into a temporary directory and renamed into place, so a crash leaves no `universal`
    directory (the next resume converts again, removing what the crashed one left) and never touches
    the original files.
    """
    final = os.path.join(tag_dir, UNIVERSAL)
    if os.path.isdir(final):
        return final
    if not os.access(tag_dir, os.W_OK):
        raise ValueError(not_writable(tag_dir))
    with _conversion_lock(tag_dir) as locked:
        if os.path.isdir(final):  # another job converted it while this one waited for the lock
            return final
        if locked:  # no conversion runs: what one left is a killed one's half-written output
            for name in os.listdir(tag_dir):
                if name.startswith(TMP_PREFIX):
                    shutil.rmtree(os.path.join(tag_dir, name), ignore_errors=True)
        _convert(tag_dir, final)
    return final


@contextlib.contextmanager
def _conversion_lock(tag_dir: str):
    """An exclusive flock on <tag_dir>/.universal.lock (another job converting the same checkpoint waits);
    yields whether it is held: False on a filesystem without file locks. The kernel drops it with its holder."""
    with open(os.path.join(tag_dir, LOCK), "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            locked = True
        except OSError:
            locked = False
        yield locked


def _convert(tag_dir: str, final: str) -> None:
    """ds_to_universal into a temporary directory of this process, renamed to `final` once whole."""
    from deepspeed.checkpoint import ds_to_universal

    tmp = os.path.join(tag_dir, f"{TMP_PREFIX}{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    # ds_to_universal writes <output>/.. /latest_universal: keep it inside tmp as well
    out = os.path.join(tmp, UNIVERSAL)
    args = types.SimpleNamespace(
        input_folder=tag_dir,
        output_folder=out,
        num_extract_workers=1,  # no fork under
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,  # torch.distributed
        inject_missing_state=True,
    )  # our model sets no universal_checkpoint_info
    try:
        with contextlib.redirect_stdout(sys.stderr):  # its progress prints; stdout is our log
            ds_to_universal.main(args)
        try:
            os.rename(out, final)
        except OSError:
            if not os.path.isdir(final):  # another job converted the same checkpoint meanwhile: use theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_resume(
    source: Optional[tuple],
    current: dict,
    rank: int,
    model: Optional[dict] = None,
    no_decay_embeddings: Optional[bool] = None,
    state: Optional[dict] = None,
    refused: Sequence[str] = (),
) -> Optional[ResumePlan]:
    """The ResumePlan for resolve_resume's (directory, tag), converting on rank 0 where needed; `state`: its
    model states, when the caller has read them; `refused`: what the checks before it refused, named with
    the plan's own refusals in one error (plan).

    Collective: every rank calls it (before deepspeed.initialize). The wait for rank 0's
    conversion uses a gloo group with a long timeout, so a slow conversion of a large
    checkpoint does not trip NCCL's collective timeout; a failure on rank 0 is raised on every rank.
    """
    if source is None:
        return None
    # what plan() refuses (the checkpoint against this run's config) is the same on every rank: rank 0 prints it
    world = dist.get_world_size() if dist.is_initialized() else 1
    what = f"reading the checkpoint {os.path.join(*source)} to resume"
    p = agreed_on_every_rank(lambda: plan(*source, current, model, state, no_decay_embeddings, refused), world, what)
    if not p.universal:
        return p
    error = None
    if rank == 0:
        done = os.path.isdir(os.path.join(p.path, UNIVERSAL))
        print(
            f"{p.path}: written by {p.saved['world_size']} rank(s) at ZeRO {p.saved['zero_stage']}, this run has "
            f"{current['world_size']} at ZeRO {current['zero_stage']}: "
            + ("using its universal copy" if done else f"converting to a universal checkpoint in {p.path}/{UNIVERSAL}"),
            flush=True,
        )
        try:
            convert_to_universal(p.path)
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            error = f"train.resume: converting {p.path} to a universal checkpoint failed: {type(e).__name__}: {e}"
    if dist.is_initialized() and dist.get_world_size() > 1:
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=6))
        box = [error]
        dist.broadcast_object_list(box, src=0, group=group)
        error = box[0]
        dist.destroy_process_group(group)
    if error:
        raise SameOnEveryRank(error)  # rank 0's, broadcast
    return p


def repair_universal_load(engine, plan: ResumePlan) -> None:
    """Undo two slips of DeepSpeed 0.19.8's ZeRO-3 universal loader
    (stage3.py, load_hp_checkpoint_state_from_checkpoint_dir_stage3):

    * it gives every optimizer param group the hyperparameters of group 0, so our no-decay group
      (norms, biases, embeddings) would get weight decay: each group gets its own back from the
      checkpoint's zero/optimizer_state.pt;
    * it stores one and the same `step` tensor in the state of every sub-group, and AdamW
      increments it in place, once per sub-group and step: each state gets its own copy.

    The ZeRO 1/2 loader does both right; doing this there too changes nothing.
    """
    base = getattr(getattr(engine, "optimizer", None), "optimizer", None)
    if base is None or not hasattr(base, "param_groups"):
        return
    path = os.path.join(plan.path, UNIVERSAL, "zero", "optimizer_state.pt")
    saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("param_groups")
    if saved is not None:
        if len(saved) != len(base.param_groups):
            raise ValueError(
                f"train.resume: {path} has {len(saved)} optimizer param groups, this run "
                f"{len(base.param_groups)} (optim.weight_decay / optim.no_decay_embeddings changed?)"
            )
        for group, stored in zip(base.param_groups, saved):
            for key, value in stored.items():
                if key != "params":
                    group[key] = value
    for state in base.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
