"""Every option of the inference commands (and plot) says in --help what it does, and one with a default
says the default: --help is where a user looks first. Nine options had no help at all (generate's and
evaluate's --device, generate's --no-stop-at-eos, evaluate's --batch-size, --max-sequences and
--num-fewshot, export's --format and --overwrite, plot's --title); evaluate's --max-length did not give its
2048."""

import argparse
import importlib

import pytest

COMMANDS = [
    "retnet_train.inference.generate",
    "retnet_train.inference.evaluate",
    "retnet_train.inference.export",
    "retnet_train.plot",
]


class Parsed(Exception):
    pass


def parser_of(module_name: str, monkeypatch) -> argparse.ArgumentParser:
    """The command's parser, caught where it parses (its parse_args, else its main)."""
    module = importlib.import_module(module_name)
    caught = {}

    def catch(self, *args, **kwargs):
        caught["parser"] = self
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(Parsed):
        (getattr(module, "parse_args", None) or module.main)([])
    return caught["parser"]


@pytest.mark.parametrize("module_name", COMMANDS)
def test_every_option_says_what_it_does_and_its_default(module_name, monkeypatch):
    parser = parser_of(module_name, monkeypatch)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help, f"{module_name} {name}: no help"
        if action.default not in (None, False, [], argparse.SUPPRESS):
            shown = action.help % {"default": action.default} if "%(default)" in action.help else action.help
            as_int = f"{action.default:,}" if isinstance(action.default, int) else None
            assert "default" in shown and (str(action.default) in shown or as_int in shown), (
                f"{module_name} {name}: its help does not give its default {action.default!r}: {shown!r}"
            )
