"""Every option of the benchmark commands whose defaults docs/quality.md and docs/scaling.md state
says in --help what it does, and one with a default says the default: bench.quality gave none of its
defaults (--tokens 50e6, --lr 1e-3, --size 125m, ...) and scaling_model none of its hardware figures
(--gpus 64, --utilization 0.25, --ib-gbit 400, ...), several options with no help at all."""

import pytest
from cli_help import assert_every_option_documented

COMMANDS = [
    "retnet_train.bench.quality",
    "retnet_train.bench.scaling_model.cli",
    "retnet_train.bench.activation_bytes",
]


@pytest.mark.parametrize("module_name", COMMANDS)
def test_every_option_says_what_it_does_and_its_default(module_name, monkeypatch):
    assert_every_option_documented(module_name, monkeypatch)
