"""Which checkpoint is the newest valid one, and its model states read with a clear error for a damaged
file: the one answer used by resuming (components/resume_source.py, components/checkpoint.py) and by the
inference loaders (inference/deepspeed_checkpoint.py).

The trainer writes <dir>/step_<N>/ (every rank's DeepSpeed files and RNG states), then
<dir>/step_<N>/COMPLETE once all ranks finished (listing those files, one name a line), then
<dir>/latest (the tag). A checkpoint is valid when it has COMPLETE, every file COMPLETE lists, a
model-states file, and no torch file in it cut short or damaged at its start. The newest valid one is
used (by step: `latest`, DeepSpeed's pointer, is written last and may lag); every newer checkpoint
passed over is named with the reason (`Choice.note`).
"""

from __future__ import annotations

import glob
import os
import re
import zipfile
from dataclasses import dataclass, field
from typing import List, Optional

COMPLETE = "COMPLETE"
LATEST = "latest"
TAG_RE = re.compile(r"^step_(\d+)$")
ZIP_START = b"PK"  # how torch.save's zip archive starts
PICKLE_START = b"\x80"  # how a pickle starts: torch's legacy format
NOT_COMPLETE = (
    f"no {COMPLETE} marker: the save was interrupted (a checkpoint written outside the trainer "
    f"needs `touch {COMPLETE}` in it once you know it is whole)"
)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def tag_step(tag: str) -> Optional[int]:
    """The step in a tag that tag_for wrote, or None for another name (a checkpoint from elsewhere)."""
    match = TAG_RE.match(tag)
    return int(match.group(1)) if match else None


def is_complete(directory: str, tag: str) -> bool:
    return os.path.isfile(os.path.join(directory, tag, COMPLETE))


def mark_complete(tag_dir: str, files) -> None:
    """Write <tag_dir>/COMPLETE listing `files` (what every rank wrote there), atomically: it is either
    absent or whole."""
    tmp = os.path.join(tag_dir, COMPLETE + ".tmp")
    with open(tmp, "w") as f:
        f.write("".join(f"{name}\n" for name in sorted(set(files) - {COMPLETE, COMPLETE + ".tmp"})))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(tag_dir, COMPLETE))


def write_latest(directory: str, tag: str) -> None:
    """Replace <directory>/latest (DeepSpeed's pointer: the tag) atomically."""
    tmp = os.path.join(directory, LATEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, LATEST))


def recorded_files(tag_dir: str) -> list:
    """The files COMPLETE lists; none for an empty marker (older saves, or one touched by hand)."""
    with open(os.path.join(tag_dir, COMPLETE), errors="replace") as f:
        return [line.strip() for line in f if line.strip()]


def checkpoint_tags(directory: str) -> list:
    """Every step_<N> dir in `directory`, complete or not, oldest first."""
    if not os.path.isdir(directory):
        return []
    return sorted((t for t in os.listdir(directory) if TAG_RE.match(t)), key=tag_step)


def complete_tags(directory: str) -> list:
    return [t for t in checkpoint_tags(directory) if is_complete(directory, t)]


def read_latest(directory: str) -> Optional[str]:
    """The tag `latest` names, or None without one."""
    pointer = os.path.join(directory, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer, errors="replace") as f:
        return f.read().strip() or None


def model_states_file(tag_dir: str) -> str:
    """DeepSpeed's model-states file of rank 0 in a checkpoint tag dir (any ZeRO stage)."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if os.path.isfile(os.path.join(tag_dir, name)):
            return os.path.join(tag_dir, name)
    found = sorted(glob.glob(os.path.join(tag_dir, "*_model_states.pt")))
    if not found:
        raise FileNotFoundError(f"{tag_dir}: no *_model_states.pt (not a DeepSpeed checkpoint, or an incomplete one)")
    return found[0]


def torch_file_damage(path: str) -> Optional[str]:
    """Why a torch.save file cannot be read (None: it looks whole). torch writes a zip archive whose
    index is at its end, so a file cut short has none; reading the index costs no tensor data. A file
    that starts as neither that archive nor a pickle (torch's legacy format) is damaged at its start."""
    if os.path.getsize(path) == 0:
        return "empty file"
    with open(path, "rb") as f:
        start = f.read(2)
    if start[:1] == PICKLE_START:
        return None  # torch's legacy (non-zip) format: nothing cheap to check
    if start != ZIP_START:
        return "truncated or damaged (it does not start as a torch.save zip archive)"
    try:
        zipfile.ZipFile(path).close()
    except (zipfile.BadZipFile, OSError) as e:
        return f"truncated or damaged ({e})"
    return None


def unreadable_torch_file(path: str) -> Optional[str]:
    """Why torch.load failed on `path`, where the file itself shows it (None: it looks whole, and torch's
    error is the one to show). torch's errors for a damaged file mislead: one not starting as its zip
    archive gets a request to save with _use_new_zipfile_serialization=True for mmap, one with a corrupt
    member an 'internal miniz error'. Reads the whole file: for an error path only."""
    why = torch_file_damage(path)
    if why:
        return why
    with open(path, "rb") as f:
        start = f.read(2)
    if start[:1] == PICKLE_START:  # torch's legacy format, which cannot be memory-mapped
        return "in torch's legacy (non-zip) format, which cannot be memory-mapped; torch.save it again"
    try:
        with zipfile.ZipFile(path) as archive:
            corrupt = archive.testzip()  # the first member whose header or CRC does not check out
    except (zipfile.BadZipFile, OSError) as e:
        return f"truncated or damaged ({e})"
    return f"damaged (its member {corrupt} is corrupt)" if corrupt else None


def read_model_states(tag_dir: str) -> dict:
    """Rank 0's model-states dict of a checkpoint (client state, DeepSpeed's counters; weights memory-mapped),
    for resuming and for inference. A file torch cannot read is a CheckpointError naming it and what the
    file shows (unreadable_torch_file), torch's error chained; an OSError of a file that looks whole (no
    permission, a mount gone) stays the I/O error it is."""
    import torch

    from ..inference.errors import CheckpointError

    path = model_states_file(tag_dir)
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # torch raises several types for a damaged file; the one-line error names it
        why = _damage_shown(path)
        if why is None and isinstance(e, OSError):
            raise
        raise CheckpointError(f"{path}: {why or f'cannot be read ({type(e).__name__}: {e})'}") from e


def _damage_shown(path: str) -> Optional[str]:
    """unreadable_torch_file, None where the file cannot be opened (torch's error says why)."""
    try:
        return unreadable_torch_file(path)
    except OSError:
        return None


def damage(directory: str, tag: str) -> Optional[str]:
    """Why <directory>/<tag> cannot be used as a checkpoint, None when it can."""
    tag_dir = os.path.join(directory, tag)
    if not os.path.isdir(tag_dir):
        return "no such checkpoint directory"
    if not is_complete(directory, tag):
        return NOT_COMPLETE
    missing = [name for name in recorded_files(tag_dir) if not os.path.isfile(os.path.join(tag_dir, name))]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        return f"{missing[0]}{more} is missing: it was written with the checkpoint"
    if not glob.glob(os.path.join(tag_dir, "*_model_states.pt")):
        return "no *_model_states.pt in it"
    for path in sorted(glob.glob(os.path.join(tag_dir, "*.pt"))):
        why = torch_file_damage(path)
        if why:
            return f"{os.path.basename(path)} is {why}"
    return None


@dataclass
class Choice:
    """The checkpoint to use in `directory` (tag None: there is none) and why each newer candidate
    was passed over, newest first."""

    directory: str
    tag: Optional[str]
    skipped: List[str] = field(default_factory=list)

    @property
    def path(self) -> str:
        return os.path.join(self.directory, self.tag)

    def note(self) -> Optional[str]:
        """One line for the log when a newer checkpoint was passed over (None: nothing was)."""
        if not self.skipped or self.tag is None:
            return None
        return f"using checkpoint {self.path}; skipped newer: " + "; ".join(self.skipped)

    def reasons(self) -> str:
        return "; ".join(self.skipped) if self.skipped else "no checkpoints there"


def choose(directory: str) -> Choice:
    """The newest valid step_<N> checkpoint in `directory`; `latest` counts only where it names a tag of
    another form (DeepSpeed's own layout), tried after those."""
    tags = list(reversed(checkpoint_tags(directory)))
    latest = read_latest(directory)
    foreign = latest is not None and latest not in tags
    skipped = []
    for tag in tags + ([latest] if foreign else []):
        why = damage(directory, tag)
        if why is None:
            return Choice(directory, tag, skipped)
        skipped.append(f"{LATEST} names {tag}: {why}" if foreign and tag == latest else f"{tag}: {why}")
    return Choice(directory, None, skipped)


def latest_valid(directory: str) -> Optional[str]:
    return choose(directory).tag


def is_tag_dir(path: str) -> bool:
    """Whether `path` is one checkpoint rather than a directory of them."""
    return bool(
        TAG_RE.match(os.path.basename(path))
        or os.path.isfile(os.path.join(path, COMPLETE))
        or glob.glob(os.path.join(path, "*_model_states.pt"))
    )


def find_checkpoint(path: str) -> Choice:
    """The checkpoint `path` names: one checkpoint (<dir>/step_N), a directory of checkpoints (its newest
    valid one), or a run dir holding checkpoints/. Choice.tag is None when there is no valid one."""
    path = os.path.abspath(path.rstrip("/") or "/")
    if is_tag_dir(path):
        directory, tag = os.path.split(path)
        why = damage(directory, tag)
        return Choice(directory, tag) if why is None else Choice(directory, None, [f"{tag}: {why}"])
    if not checkpoint_tags(path) and read_latest(path) is None and os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")  # a run dir
    return choose(path)
