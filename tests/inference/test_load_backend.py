"""A checkpoint's retention_backend is how training ran, not what the weights compute: loading for a
device where that backend cannot run (triton or fla on CPU) runs the backend that can, with equal logits."""

import pytest
import torch
from gen_fixtures import VOCAB, tiny_model

from retnet_train.inference.load import load_model
from retnet_train.inference.native import save_native


@pytest.mark.parametrize("backend", ["triton", "fla"])
def test_a_gpu_backend_checkpoint_loads_and_runs_on_cpu(tmp_path, capsys, backend):
    reference = tiny_model()  # the torch backend
    trained_on_gpu = tiny_model(retention_backend=backend)
    trained_on_gpu.load_state_dict(reference.state_dict())
    save_native(trained_on_gpu, str(tmp_path / "exp"))
    loaded = load_model(str(tmp_path / "exp"), device="cpu")
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded.model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    assert f"retention_backend={backend} cannot run on cpu" in capsys.readouterr().err
