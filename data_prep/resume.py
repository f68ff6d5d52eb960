"""What a re-run of data_prep.tokenize keeps: a finished output of the same inputs and settings
(found by the fingerprint its manifest records), or the verified shards of an unfinished one (found
through its journal, see data_prep.shard_writer)."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import numpy as np

from data_prep.shard_writer import Journal, SplitShardWriter, verified_prefix
from data_prep.sources import Source, load_source
from data_prep.tokenizer_card import Tokenizer
from retnet_train.data.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    SPLITS,
    Manifest,
    ManifestError,
    SplitInfo,
    read_manifest,
    verify_shards,
)


@dataclass(frozen=True)
class Layout:
    """The settings that decide the shards' bytes: an unfinished run is resumed only under the same ones."""

    validation_fraction: float
    seed: int
    shard_tokens: int
    add_bos: bool
    dtype: str


def finished_output(
    source: Source, tok: Tokenizer, out_dir: Path, layout: Layout, cache_dir: str | None
) -> Manifest | None:
    """The manifest in `out_dir` if a finished run of these same inputs and settings wrote it, else
    None. Running the same command again after a kill in a later source finds the earlier ones
    finished: they are kept (not replaced, not refused), so the command resumes as a whole."""
    if not (out_dir / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = read_manifest(out_dir)
    except ManifestError:
        return None  # check_shard_dir names the problem
    if "fingerprint" not in manifest.extra:  # written before manifests recorded it: cannot tell
        return None
    if manifest.extra["fingerprint"] != settings_fingerprint(source, load_source(source, cache_dir), tok, layout):
        return None
    problems = verify_shards(manifest, checksums=False)
    if problems:
        raise ManifestError(
            f"{manifest.path}: finished output of these inputs and settings has damaged shards "
            "(pass --overwrite to rebuild it):\n  " + "\n  ".join(problems)
        )
    print(f"{out_dir}: already finished with these inputs and settings; kept")
    return manifest


def settings_fingerprint(source: Source, corpus: datasets.Dataset, tok: Tokenizer, layout: Layout) -> str:
    """What an unfinished run must share with this one to be resumed: inputs, tokenizer and layout."""
    settings = {
        "format_version": FORMAT_VERSION,
        "tokenizer_sha256": tok.sha256,
        "source": source.describe(),
        # an input edited in place must not be resumed into shards made from its old content
        "mtimes": [p.stat().st_mtime_ns for p in source.files],
        "documents": len(corpus),
        **asdict(layout),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def output_manifest(
    source: Source, tok: Tokenizer, out_dir: Path, layout: Layout, splits: dict[str, SplitInfo], fingerprint: str
) -> Manifest:
    """The manifest of a finished run: the shards, their tokenizer and layout, and the fingerprint."""
    split_rule = {"validation_fraction": layout.validation_fraction, "seed": layout.seed, "unit": "document"}
    return Manifest(
        directory=out_dir,
        vocab_size=tok.vocab_size,
        eos_id=tok.eos_id,
        bos_id=tok.bos_id,
        pad_id=tok.pad_id,
        unk_id=tok.unk_id,
        tokenizer_sha256=tok.sha256,
        dtype=layout.dtype,
        shard_tokens=layout.shard_tokens,
        splits=splits,
        extra={
            "add_bos": layout.add_bos,
            "split_rule": split_rule,
            "source": source.describe(),
            "fingerprint": fingerprint,  # a re-run of the same command keeps this output (finished_output)
            "created_unix": int(time.time()),
        },
    )


def resumed_writers(
    journal: Journal, corpus: datasets.Dataset, dtype: np.dtype, shard_tokens: int, eos_id: int
) -> dict[str, SplitShardWriter]:
    """Writers that continue after the verified shards of an unfinished run with the same settings
    (saying so); its damaged or unfinished shards are deleted: the journal recorded them."""
    directory = journal.path.parent
    unfinished = journal.path.exists()
    records = journal.read()
    kept = {split: verified_prefix(directory, split, records, dtype.itemsize) for split in SPLITS}
    kept_files = {r["file"] for rs in kept.values() for r in rs}
    redo = sorted({r["file"] for r in records} - kept_files)
    for name in redo:
        (directory / name).unlink(missing_ok=True)
    journal.start([r for split in SPLITS for r in kept[split]])
    writers = {
        split: SplitShardWriter(directory, split, dtype, shard_tokens, eos_id, journal, kept[split]) for split in SPLITS
    }
    if unfinished:
        at = {split: w.resume.doc for split, w in writers.items()}
        print(
            f"{directory}: resuming an unfinished run at document {min(at.values())} of {len(corpus)} "
            f"(train continues at document {at['train']}, validation at {at['validation']}); kept "
            f"{len(kept_files)} verified shards" + (f", redoing {len(redo)} ({', '.join(redo)})" if redo else "")
        )
    return writers
