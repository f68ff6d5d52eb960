"""A tokenize killed with SIGKILL takes its datasets.map worker processes with it."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from prep_helpers import make_tokenizer, write_jsonl

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


def children_of(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


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
        kids = children_of(proc.pid)
        workers = {int(p.suffix[1:]) for p in run_dir.glob("worker.*")}
        assert workers <= set(kids)  # the manager process is a child too
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 10
        while any(alive(k) for k in kids) and time.time() < deadline:
            time.sleep(0.1)
        assert [k for k in kids if alive(k)] == []
    finally:
        proc.kill()
        for k in kids:  # only if the assertion above failed: leave no process behind
            if alive(k):
                os.kill(k, signal.SIGKILL)
