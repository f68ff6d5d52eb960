"""Re-check shard directories against their manifests.

    python -m data_prep.verify DIR [DIR ...] [--sizes-only]

DIR is a shard directory (with manifest.json) or a root whose subdirectories are. Prints one line
per bad file (missing, wrong size, wrong sha256) and per source a stopped tokenize left unfinished,
and exits 1 if there is any.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from data_prep.cli import command_parser
from data_prep.shard_writer import JOURNAL_NAME
from retnet_train.data.manifest import MANIFEST_NAME, ManifestError, read_manifest, verify_shards


def _dirs_holding(root: Path, name: str) -> list[Path]:
    """root if it holds file `name`, else its subdirectories that do."""
    if (root / name).is_file():
        return [root]
    return sorted(p.parent for p in root.glob(f"*/{name}"))


def shard_dirs(root: Path) -> list[Path]:
    found = _dirs_holding(root, MANIFEST_NAME)
    if not found:
        raise ManifestError(f"{root}: no {MANIFEST_NAME} here or in its subdirectories")
    return found


def unfinished_dirs(root: Path) -> list[Path]:
    """Source directories a tokenize run left unfinished: a resume journal and no manifest yet."""
    return [d for d in _dirs_holding(root, JOURNAL_NAME) if not (d / MANIFEST_NAME).is_file()]


def verify_directory(directory: str | Path, checksums: bool = True) -> list[str]:
    """All problems of all shard directories under `directory` (manifest errors included), and the
    unfinished ones (a root with a finished source beside an unfinished one is not whole)."""
    problems = [
        f"{d}: unfinished tokenize ({JOURNAL_NAME}, no {MANIFEST_NAME}): run the same command again to resume"
        for d in unfinished_dirs(Path(directory))
    ]
    try:
        dirs = shard_dirs(Path(directory))
    except ManifestError as e:
        return problems or [str(e)]
    for d in dirs:
        try:
            problems += verify_shards(read_manifest(d), checksums=checksums)
        except ManifestError as e:
            problems.append(str(e))
    return problems


def main(argv: Sequence[str] | None = None) -> None:
    p = command_parser("verify", __doc__)
    p.add_argument("dirs", nargs="+", type=Path, help="a shard directory, or a root whose subdirectories are")
    p.add_argument("--sizes-only", action="store_true", help="skip the sha256 pass (fast)")
    a = p.parse_args(argv)
    bad = 0
    for d in a.dirs:
        problems = verify_directory(d, checksums=not a.sizes_only)
        for problem in problems:
            print(f"BAD {problem}")
        if not problems:
            print(f"ok  {d}")
        bad += len(problems)
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
