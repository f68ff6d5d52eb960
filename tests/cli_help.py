"""The command-line tools' --help: each option says what it does, and one with a default gives it."""

import argparse
import importlib

import pytest


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


def assert_every_option_documented(module_name: str, monkeypatch) -> None:
    for action in parser_of(module_name, monkeypatch)._actions:
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
