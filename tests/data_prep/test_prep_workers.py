"""A tokenize killed with SIGKILL takes its datasets.map worker processes with it."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from prep_helpers import make_tokenizer, write_jsonl
from process_tree import children, running

REPO = Path(__file__).resolve().parents[2]

# every worker records its pid, then hangs in the middle of its batch
SCRIPT = """
import os, sys, time
import data_prep.tokenize as tokenize
from data_prep.sources import parse_source
corpus, model, run_dir = sys.argv[1:]
def hang(self, batch):
    open(os.path.join(run_dir, f"worker.{os.getpid()}"), "w").close()
    time.sleep(600)
tokenize._Encoder.__call__ = hang
tokenize.tokenize_source(parse_source("c=" + corpus), model, os.path.join(run_dir, "out"), num_proc=2,
                         progress=False, cache_dir=os.path.join(run_dir, "cache"))
"""


def test_workers_die_with_a_killed_tokenize(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    corpus = write_jsonl(tmp_path / "c.jsonl", [f"text {i}" for i in range(40)])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(corpus), str(tok.path), str(run_dir)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    kids = []
    try:
        deadline = time.time() + 120
        while len(list(run_dir.glob("worker.*"))) < 2:
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.time() < deadline, "the workers never started"
            time.sleep(0.2)
        kids = children(proc.pid)
        workers = {int(p.suffix[1:]) for p in run_dir.glob("worker.*")}
        assert workers <= set(kids)  # the manager process is a child too
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 10
        while any(running(k) for k in kids) and time.time() < deadline:
            time.sleep(0.1)
        assert [k for k in kids if running(k)] == []
    finally:
        proc.kill()
        for k in kids:  # only if the assertion above failed: leave no process behind
            if running(k):
                os.kill(k, signal.SIGKILL)
