"""The training loader says whether every training document starts with BOS (the manifests' `add_bos`,
data_prep.tokenize --bos): the framing a prompt must have at inference."""

import json

import numpy as np
import pytest
from shard_fixtures import position_tokens, write_shard_dir
from test_megatron_source import documents, write_mmidx

from retnet_train.data import ManifestError, TokenLoader
from retnet_train.data.manifest import MANIFEST_NAME


def shard_dir(path, add_bos="absent"):
    """A shard dir whose manifest has add_bos = the value given (or no such key)."""
    write_shard_dir(path, position_tokens(400), shard_tokens=400)
    if add_bos != "absent":
        manifest = json.loads((path / MANIFEST_NAME).read_text())
        (path / MANIFEST_NAME).write_text(json.dumps({**manifest, "add_bos": add_bos}))
    return str(path)


def loader(sources, eos_id=None):
    return TokenLoader({name: (path, 1.0) for name, path in sources.items()}, 8, 2, eos_id=eos_id)


@pytest.mark.parametrize("add_bos,expected", [(True, True), (False, False), ("absent", False)])
def test_one_source_framing(tmp_path, add_bos, expected):
    assert loader({"a": shard_dir(tmp_path / "a", add_bos)}).documents_start_with_bos is expected


def test_every_source_must_start_documents_with_bos(tmp_path):
    bos_a, bos_b = shard_dir(tmp_path / "a", True), shard_dir(tmp_path / "b", True)
    assert loader({"a": bos_a, "b": bos_b}).documents_start_with_bos is True
    mixed = loader({"a": bos_a, "plain": shard_dir(tmp_path / "plain", False)})
    assert mixed.documents_start_with_bos is False


def test_a_megatron_source_records_no_bos(tmp_path):
    docs = [np.append(d[:-1] % 400 + 10, 2) for d in documents()]  # EOS 2, ids in the shards' range
    write_mmidx(tmp_path / "meg_text_document", docs)
    sources = {"a": shard_dir(tmp_path / "a", True), "meg": str(tmp_path / "meg_text_document")}
    assert loader(sources).documents_start_with_bos is False


def test_a_malformed_add_bos_names_the_manifest_and_key(tmp_path):
    path = shard_dir(tmp_path / "a", "yes")
    with pytest.raises(ManifestError, match=rf"{tmp_path}/a/manifest.json: key 'add_bos' must be true or false, got"):
        loader({"a": path})
