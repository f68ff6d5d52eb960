"""Generated text written as it is produced."""

from __future__ import annotations

import json
import sys
from typing import Callable, Iterable, List, Optional

import torch


class TextStreamer:
    """Incremental text per row: sentencepiece decodes whole sequences (pieces join with spaces
    only in context), so each call decodes the row so far and prints the new suffix."""

    def __init__(
        self, sp, n_rows: int, write: Optional[Callable[[str], None]] = None, jsonl_prompts: Optional[list] = None
    ):
        """jsonl_prompts: each row's prompt text; then a finished row is one JSON line (index, prompt,
        completion) and nothing streams."""
        self.sp, self._write, self.jsonl_prompts = sp, write, jsonl_prompts
        self.tokens: List[List[int]] = [[] for _ in range(n_rows)]
        self.printed = [""] * n_rows
        self.done = [False] * n_rows

    def __call__(self, tokens: torch.Tensor, finished: torch.Tensor, first_row: int = 0) -> None:
        """The step's token per row of a batch whose rows are this streamer's first_row, first_row + 1, ..."""
        for i, (t, f) in enumerate(zip(tokens.tolist(), finished.tolist()), start=first_row):
            if self.done[i]:
                continue
            if not f:
                self.tokens[i].append(t)
            if len(self.tokens) == 1 and self.jsonl_prompts is None:
                text = self.sp.decode(self.tokens[i])
                # a character split over byte-fallback pieces decodes as U+FFFD until its last byte
                # arrives, and then the text gets shorter: print only up to whole characters
                if not text.endswith("\ufffd"):
                    self.write(text[len(self.printed[i]) :])
                    self.printed[i] = text
            if f:
                self._finish(i)
        sys.stdout.flush()

    def write(self, text: str) -> None:
        (self._write or sys.stdout.write)(text)  # sys.stdout looked up late: it may be replaced

    def _finish(self, i: int) -> None:
        self.done[i] = True
        if self.jsonl_prompts is not None:
            row = {"index": i, "prompt": self.jsonl_prompts[i], "completion": self.sp.decode(self.tokens[i])}
            self.write(json.dumps(row, ensure_ascii=False) + "\n")
        elif len(self.tokens) == 1:
            self.write(self.sp.decode(self.tokens[i])[len(self.printed[i]) :] + "\n")  # anything held back
        else:
            self.write(f"[{i}] {self.sp.decode(self.tokens[i])}\n")

    def close(self, rows: Optional[Iterable[int]] = None) -> None:
        """Ends the rows (default: all) that are not finished yet."""
        for i in range(len(self.tokens)) if rows is None else rows:
            if not self.done[i]:
                self._finish(i)
