"""--model-config against a checkpoint that stores its own model config: it may change how the weights
are computed (mode, chunk_size, retention_backend), never what they compute: such a change would give
other logits from the same weights without a word, so it is refused naming the keys."""

import pytest
import torch
from gen_fixtures import VOCAB, tiny_config, write_deepspeed_checkpoint

from retnet_train.inference.errors import CheckpointError
from retnet_train.inference.load import load_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    save = tmp_path_factory.mktemp("ckpt")
    model = write_deepspeed_checkpoint(save, tiny_config(), 0, {"config": {"model": tiny_config()}}, steps=1)
    return save, model.eval()


def test_a_preset_that_changes_what_the_weights_compute_is_refused(checkpoint):
    save, _ = checkpoint
    preset = tiny_config(normalize_retention=False, norm_eps=1e-5)  # the same shapes: the weights would load
    with pytest.raises(CheckpointError, match=r"--model-config: .*norm_eps: 1e-06 -> 1e-05.*normalize_retention"):
        load_model(str(save), model_config=preset)


def test_a_preset_may_change_how_they_are_computed(checkpoint):
    save, trained = checkpoint
    loaded = load_model(str(save), model_config=tiny_config(chunk_size=8, mode="parallel"))
    assert (loaded.config.chunk_size, loaded.config.mode) == (8, "parallel")
    ids = torch.randint(0, VOCAB, (1, 13), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded.model(ids).logits, trained(ids).logits)
