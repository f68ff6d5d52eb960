"""Every option of the inference commands (and plot) says in --help what it does, and one with a default
says the default: --help is where a user looks first. Nine options had no help at all (generate's and
evaluate's --device, generate's --no-stop-at-eos, evaluate's --batch-size, --max-sequences and
--num-fewshot, export's --format and --overwrite, plot's --title); evaluate's --max-length did not give its
2048."""

import pytest
from cli_help import assert_every_option_documented

COMMANDS = [
    "retnet_train.inference.generate",
    "retnet_train.inference.evaluate",
    "retnet_train.inference.export",
    "retnet_train.plot",
]


@pytest.mark.parametrize("module_name", COMMANDS)
def test_every_option_says_what_it_does_and_its_default(module_name, monkeypatch):
    assert_every_option_documented(module_name, monkeypatch)
