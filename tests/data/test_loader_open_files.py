"""A source of many shards: the loader keeps a bounded number of them open, whatever their count."""

import os

import numpy as np
import pytest
from shard_fixtures import EOS, FIRST_ID, position_tokens, write_shard_dir

from retnet_train.data import ManifestError, TokenLoader, build_validation_loader

SEQ = 16
FD_DIR = "/proc/self/fd"


def open_files() -> int:
    return len(os.listdir(FD_DIR))


def window_start(row: np.ndarray) -> int | None:
    """The position a window of shard_fixtures.position_tokens starts at (consecutive position-coded ids,
    EOS ending every 37th token); None when the row is not such a window."""
    known = int(np.flatnonzero(row != EOS)[0])
    positions = row[known] - FIRST_ID - known + np.arange(row.size)
    return int(positions[0]) if np.array_equal(row, np.where(positions % 37 == 36, EOS, positions + FIRST_ID)) else None


@pytest.mark.skipif(not os.path.isdir(FD_DIR), reason="counts open files in /proc")
def test_a_source_of_many_shards_keeps_few_files_open(tmp_path):
    """Each shard held open (a memory map keeps its file descriptor) ran a source of more shards than
    `ulimit -n` into 'Too many open files' at start: 1,000 shards of the default size is 128B tokens."""
    tokens = position_tokens(3000)
    write_shard_dir(tmp_path / "src", tokens, validation=tokens, shard_tokens=10)  # 300 shards per split
    sources = {"src": (tmp_path / "src", 1.0)}
    before = open_files()
    loader = TokenLoader(sources, SEQ, 8, seed=3)
    batches = [next(loader) for _ in range(2 * loader.windows["src"] // 8)]  # every window, twice
    batches += list(build_validation_loader(sources, SEQ, 8))
    assert open_files() - before < 64
    rows = np.concatenate([batch["input_ids"].numpy() for batch in batches])
    assert {window_start(row) for row in rows} == set(range(0, 3000 - SEQ, SEQ))  # every window, as written


def test_a_shard_replaced_while_the_run_reads_is_an_error_naming_it(tmp_path):
    """Shards are mapped as they are read, so a shard that data_prep --overwrite (or anyone) replaced or
    rewrote after the loader opened would be read as it is now: other data than the run's checkpoints
    claim (their digest is of the data at start). It is refused, naming the file, when it is next mapped."""
    tokens = position_tokens(3000)
    write_shard_dir(tmp_path / "src", tokens, shard_tokens=10)  # 300 shards: more than stay mapped
    loader = TokenLoader({"src": (tmp_path / "src", 1.0)}, SEQ, 8, seed=3)
    next(loader)
    replaced = tmp_path / "src" / "train_00150.bin"
    other = tmp_path / "src" / "new.tmp"
    (np.arange(10, dtype="<u4") + 500_000).tofile(other)  # another shard of the same size, renamed over it
    os.replace(other, replaced)
    with pytest.raises(ManifestError, match=rf"{replaced}: changed since the loader opened it"):
        for _ in range(loader.windows["src"] // 8):
            next(loader)
