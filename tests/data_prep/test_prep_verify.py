import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.verify import verify_directory
from retnet_train.data.manifest import Manifest, ShardInfo, SplitInfo, sha256_file

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def shards(tmp_path):
    d = tmp_path / "root" / "src"
    d.mkdir(parents=True)
    infos = []
    for i in range(3):
        (d / f"train_{i:05d}.bin").write_bytes(bytes(range(i, i + 200)))
        infos.append(ShardInfo(f"train_{i:05d}.bin", 100, 0, sha256_file(d / f"train_{i:05d}.bin")))
    m = Manifest(d, 8192, 2, 1, 3, 0, "ab" * 32, "uint16", 100, {"train": SplitInfo(300, 0, tuple(infos))})
    (d / "manifest.json").write_text(json.dumps(m.to_json()))
    return d


def run_verify(*args):
    return subprocess.run(
        [sys.executable, "-m", "data_prep.verify", *map(str, args)], cwd=REPO, capture_output=True, text=True
    )


def test_good_directory_passes(shards):
    assert verify_directory(shards) == []
    result = run_verify(shards.parent)  # a root of source directories works too
    assert result.returncode == 0, result.stdout + result.stderr


def test_names_every_bad_file(shards):
    (shards / "train_00000.bin").write_bytes(b"\x00" * 199)  # truncated
    data = bytearray((shards / "train_00002.bin").read_bytes())
    data[0] ^= 1  # same size, flipped bit
    (shards / "train_00002.bin").write_bytes(bytes(data))
    result = run_verify(shards)
    assert result.returncode == 1
    bad = [line for line in result.stdout.splitlines() if line.startswith("BAD")]
    assert len(bad) == 2
    manifest = shards / "manifest.json"  # each line names the shard file, the manifest and the shard's entry
    assert bad[0] == (
        f"BAD {shards}/train_00000.bin: size 199 bytes, but {manifest} splits.train.shards[0] "
        "says 100 uint16 tokens (200 bytes)"
    )
    found, listed = sha256_file(shards / "train_00002.bin")[:12], json.loads(manifest.read_text())
    recorded = listed["splits"]["train"]["shards"][2]["sha256"][:12]
    assert bad[1] == (
        f"BAD {shards}/train_00002.bin: sha256 {found}... does not match {recorded}... "
        f"in {manifest} splits.train.shards[2]"
    )
    assert len(verify_directory(shards, checksums=False)) == 1  # --sizes-only misses the bit flip


def test_missing_shard_and_missing_manifest(shards, tmp_path):
    (shards / "train_00001.bin").unlink()
    assert verify_directory(shards) == [
        f"{shards}/train_00001.bin: missing (listed in {shards / 'manifest.json'} splits.train.shards[1])"
    ]
    result = run_verify(tmp_path / "nowhere")
    assert result.returncode == 1 and "no manifest.json" in result.stdout


def test_an_unfinished_source_is_named(shards):
    """A root whose other source a stopped tokenize left unfinished (its journal, no manifest) is not whole."""
    unfinished = shards.parent / "web"
    unfinished.mkdir()
    (unfinished / "train_00000.bin").write_bytes(b"\x00" * 200)
    (unfinished / "progress.jsonl").write_text("{}\n")
    expected = (
        f"{unfinished}: unfinished tokenize (progress.jsonl, no manifest.json): run the same command again to resume"
    )
    assert verify_directory(shards.parent) == [expected]
    assert verify_directory(unfinished) == [expected]  # not also "no manifest.json here"
    result = run_verify(shards.parent)
    assert result.returncode == 1 and result.stdout.splitlines() == [f"BAD {expected}"]
    assert verify_directory(shards) == []  # the finished source itself is whole
