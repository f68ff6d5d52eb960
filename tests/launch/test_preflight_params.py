"""retnet_train.preflight's parameter count for the free-space check: from a model preset, a
`model=` override or --params, and the presets it refuses."""

from __future__ import annotations

import pytest
from launch_helpers import ROOT
from preflight_helpers import TINY_PRESET, tiny_params

from retnet_train import preflight as pf


def test_parameter_counts():
    import torch
    import yaml

    from retnet_train.model import build_model, model_config_from_dict

    preset = yaml.safe_load(TINY_PRESET.read_text())
    ref = sum(p.numel() for p in build_model(model_config_from_dict(preset)).parameters())
    assert tiny_params() == ref
    # The paper's sizes, to within 5% (the name is the size).
    for name, size in [("1.3b", 1.3e9), ("6.7b", 6.7e9)]:
        assert abs(pf.params_from_preset(ROOT / f"configs/model/{name}.yaml") / size - 1) < 0.05
    assert pf.parse_params("1.3e9") == 1_300_000_000 and pf.parse_params("125000000") == 125_000_000
    assert torch.get_default_device().type == "cpu"  # the meta-device build leaves no global state


def test_params_come_from_the_model_override(tmp_path):
    args = pf.build_parser().parse_args(["--", "experiment=x", "+model=tiny", "optim.model=1.3b"])
    n, src = pf.resolve_params(args)
    assert src == "configs/model/tiny.yaml" and n == tiny_params()
    assert pf.override_value(["model=a", "model=b"], "model") == "b"
    assert pf.override_value(["++model=c"], "model") == "c"
    assert pf.resolve_params(pf.build_parser().parse_args(["--params", "2e9", "--", "model=tiny"])) == (
        2_000_000_000,
        "--params",
    )
    assert pf.resolve_params(pf.build_parser().parse_args([])) == (None, "")


def test_bad_model_presets(tmp_path):
    bad = tmp_path / "bad.yaml"
    for text, fragment in [
        ("d_model: [", "not valid YAML"),
        ("- 1\n- 2\n", "expected a mapping"),
        ("arch: retnet\nd_modle: 64\n", "model.d_modle: unknown key"),
        ("arch: retnet\nd_model: 100\nn_heads: 3\n", "does not divide"),
    ]:
        bad.write_text(text)
        with pytest.raises(pf.PreflightError) as exc:
            pf.params_from_preset(bad)
        assert str(exc.value).startswith(f"--model-preset {bad}: ") and fragment in str(exc.value)
    with pytest.raises(pf.PreflightError, match="no such file"):
        pf.params_from_preset(tmp_path / "missing.yaml")
