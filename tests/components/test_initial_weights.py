"""train.init_weights: a fresh run starts from an export's or a checkpoint's weights; what does not fit
is refused naming the key and the path."""

import pytest
import torch

from retnet_train.components.checkpoint import load_initial_weights
from retnet_train.inference.native import save_native
from retnet_train.model import build_model, model_config_from_dict

TINY = {"arch": "transformer", "vocab_size": 64, "d_model": 32, "n_layers": 1, "n_heads": 2, "ffn_dim": 64}


def model(**change):
    torch.manual_seed(len(change))
    return build_model(model_config_from_dict({**TINY, **change}))


def test_an_export_loads_into_a_model_of_its_config(tmp_path):
    source = model(init="normal")  # other draws than the target's
    save_native(source, str(tmp_path / "export"))
    target = model()
    load_initial_weights(target, str(tmp_path / "export"))
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "where,needle",
    [
        ("missing", "no such checkpoint or export directory"),
        ("file", "a file; pass the directory"),
        ("wider", "has shape (64, 48), the config needs (64, 32)"),
        ("untied", "tie_embeddings=true, but the weights' LM head (lm_head.weight) differs"),
    ],
)
def test_what_does_not_fit_is_refused_naming_the_key(tmp_path, where, needle):
    path = tmp_path / "export"
    if where == "file":
        path.write_text("x")
    if where == "wider":
        save_native(model(d_model=48), str(path))
    if where == "untied":
        save_native(model(), str(path))
    target = model(tie_embeddings=True) if where == "untied" else model()
    with pytest.raises(ValueError, match=f"^train.init_weights: {path}") as e:
        load_initial_weights(target, str(path))
    assert needle in str(e.value)
