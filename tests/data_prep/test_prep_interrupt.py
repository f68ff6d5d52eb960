"""Ctrl-C in a terminal signals the whole process group: tokenize and its datasets.map workers. The run
stops with status 130 and its one-line message, leaves no process behind, and the same command resumes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from prep_helpers import make_tokenizer, write_jsonl
from process_tree import descendants, running

REPO = Path(__file__).resolve().parents[2]

# every worker records its pid, then takes a while over its batch: the Ctrl-C lands in the middle of it
SCRIPT = """
import os, sys, time
import data_prep.tokenize as tokenize
run_dir = sys.argv[1]
encode = tokenize._Encoder.__call__
def slow(self, batch):
    open(os.path.join(run_dir, f"worker.{os.getpid()}"), "w").close()
    time.sleep(3)
    return encode(self, batch)
tokenize._Encoder.__call__ = slow
tokenize.main(sys.argv[2:])
"""


def _wait_for_workers(proc: subprocess.Popen, run_dir: Path) -> None:
    deadline = time.time() + 120
    while len(list(run_dir.glob("worker.*"))) < 2:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline, "the workers never started"
        time.sleep(0.1)


def test_ctrl_c_to_the_process_group_stops_cleanly_and_resumes(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    corpus = write_jsonl(tmp_path / "c.jsonl", [f"text number {i}" for i in range(40)])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    argv = [
        f"--tokenizer={tok.path}",
        f"--out={tmp_path / 'out'}",
        f"--source=c={corpus}",
        "--num-proc=2",
        "--chunk-docs=20",
        "--shard-tokens=50",
        f"--cache-dir={tmp_path / 'cache'}",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(run_dir), *argv],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a process group of its own, as a terminal's foreground job
    )
    kids = []
    try:
        _wait_for_workers(proc, run_dir)
        kids = descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert (proc.returncode, err.strip().splitlines()[-1]) == (
            130,
            "interrupted: run the same command again to resume",
        ), err[-3000:]
        assert "Traceback" not in err
        deadline = time.time() + 10
        while any(running(k) for k in kids) and time.time() < deadline:
            time.sleep(0.1)
        assert [k for k in kids if running(k)] == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for k in kids:  # only if an assertion above failed: leave no process behind
            if running(k):
                os.kill(k, signal.SIGKILL)
    again = subprocess.run(
        [sys.executable, "-m", "data_prep.tokenize", *argv], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert (tmp_path / "out" / "c" / "manifest.json").is_file()
