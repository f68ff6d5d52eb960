"""CausalLMOutput: attributes over a dict, so that DeepSpeed finds the loss in it (test_grad_accum_dtype.py
checks what depends on that)."""

import pytest
import torch

from retnet_train.model import CausalLMOutput


def test_output_is_a_dict_read_and_set_as_attributes():
    loss = torch.tensor(1.5, requires_grad=True) * 2
    out = CausalLMOutput(logits=None, loss=loss)
    assert isinstance(out, dict) and out.loss is loss and out["loss"] is loss and out.logits is None
    assert list(out) == ["logits", "loss", "state"] and out.state is None
    out.state = "s"
    assert out["state"] == "s"
    with pytest.raises(AttributeError, match="no attribute 'los'"):
        _ = out.los
    with pytest.raises(AttributeError, match="no field 'los'"):
        out.los = loss
    assert not hasattr(out, "logit")
