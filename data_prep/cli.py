"""What every data_prep command shares: its parser (usage names it as it is run, its docstring is the
help) and what it does on Ctrl-C (one line on stderr, not a traceback, and the shell's status for
SIGINT, 130)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Iterator

EXIT_INTERRUPTED = 130  # 128 + SIGINT


class CommandParser(argparse.ArgumentParser):
    """argparse's parser whose errors (a mistyped, unknown or missing flag) are one line naming the flag, as
    the inference commands' are (retnet_train/inference/cli.py); argparse printed its whole usage first. The
    status stays argparse's 2; --help shows the usage."""

    def error(self, message: str):
        self.exit(2, f"error: {message.removeprefix('argument ')} (--help lists the options)\n")


def command_parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """The parser of `python -m data_prep.<name>`, its docstring shown as written."""
    return CommandParser(
        prog=f"python -m data_prep.{name}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


@contextlib.contextmanager
def interrupt_exits(next_step: str) -> Iterator[None]:
    """A KeyboardInterrupt inside the block exits with "interrupted: `next_step`" and status 130."""
    try:
        yield
    except KeyboardInterrupt:
        print(f"interrupted: {next_step}", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
