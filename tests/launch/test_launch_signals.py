"""launch/torchrun.sh, launch/deepspeed.sh and launch/slurm/*.sbatch with the stop signals, for real in
subprocesses: $PYTHON is a stand-in that runs fake_launcher.py for torchrun and the preflight and
fake_deepspeed.py for DeepSpeed's runner (the real interpreter for the rest). A SIGTERM or SIGUSR1 to the
script alone, to its process group or to every process one by one (as SLURM signals a step) reaches the
workers, and the launcher's processes never get a SIGTERM from the script (a second one aborts torchrun's
shutdown; DeepSpeed's runner dies of one, launch.py SIGKILLs the workers 30 s after it); one that comes
before any worker runs ends the script with 75 and writes 75 to the status file, on which the sbatch
script requeues the job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch_helpers import ROOT, fake_slurm
from process_tree import descendants, running


def ends_soon(pid: int) -> bool:
    deadline = time.time() + 5
    while running(pid) and time.time() < deadline:
        time.sleep(0.05)  # a SIGKILL takes effect asynchronously
    return not running(pid)


def signal_each(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


TORCHRUN, DEEPSPEED = (
    ("launch/torchrun.sh", "--nproc-per-node", "2"),
    ("launch/deepspeed.sh",),
)  # script and options of the runs below

FAKE_PYTHON = """#!/usr/bin/env bash
# $PYTHON for these tests: fake_launcher.py for torchrun and the preflight, fake_deepspeed.py for DeepSpeed's runner
case "$1 ${2:-}" in
  "-m torch.distributed.run") shift 2; exec "$REAL_PYTHON" "$FAKE_LAUNCHER" "$@" ;;
  "-m deepspeed.launcher.runner")
    if [[ " $* " == *" retnet_train.preflight "* ]]; then exec "$REAL_PYTHON" "$FAKE_LAUNCHER" --preflight; fi
    exec "$REAL_PYTHON" "$FAKE_DEEPSPEED" --runner ;;
  "-m retnet_train.preflight") exec "$REAL_PYTHON" "$FAKE_LAUNCHER" --preflight ;;
esac
exec "$REAL_PYTHON" "$@"
"""
FAKE_SRUN = """#!/usr/bin/env bash
# stand-in srun: runs the one task of this node as its child (the step: every process below this one)
echo "$$" > "$SRUN_PID_FILE"
while [[ "$1" == --* ]]; do shift; done
"$@"
"""


class Launch:
    """One launch under the fakes; `log` is what the fake processes did."""

    def __init__(self, tmp_path: Path, **env: str):
        self.tmp = tmp_path
        self.log = tmp_path / "fake.log"
        self.status = tmp_path / "status"
        self.status.write_text("")  # as the sbatch script creates it
        bindir = tmp_path / "bin"
        bindir.mkdir()
        for name, text in (
            ("python", FAKE_PYTHON),
            ("srun", FAKE_SRUN),
            ("scontrol", 'echo "$@" >> "$SCONTROL_LOG"\n'),
        ):
            (bindir / name).write_text(text if text.startswith("#!") else f"#!/usr/bin/env bash\n{text}")
            (bindir / name).chmod(0o755)
        self.env = {
            "PATH": f"{bindir}:{os.environ['PATH']}",
            "HOME": os.environ.get("HOME", "/root"),
            "USER": "alice",
            "TMPDIR": str(tmp_path),
            "PYTHON": str(bindir / "python"),
            "REAL_PYTHON": sys.executable,
            "FAKE_LAUNCHER": str(Path(__file__).with_name("fake_launcher.py")),
            "FAKE_DEEPSPEED": str(Path(__file__).with_name("fake_deepspeed.py")),
            "FAKE_LOG": str(self.log),
            "RETNET_EXIT_STATUS_FILE": str(self.status),
            "SRUN_PID_FILE": str(tmp_path / "srun.pid"),
            "SCONTROL_LOG": str(tmp_path / "scontrol.log"),
            **env,
        }
        self.proc: subprocess.Popen | None = None

    def start(self, script: str, *args: str) -> None:
        # a session of its own: its process group is the "foreground group" that Ctrl-C signals
        self.proc = subprocess.Popen(
            ["bash", str(ROOT / script), *args],
            cwd=self.tmp,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def wait_for(self, what: str, count: int = 1) -> None:
        deadline = time.time() + 30
        while sum(what in line for line in self.lines()) < count:
            assert self.proc.poll() is None and time.time() < deadline, (what, self.lines(), self.proc.stderr.read())
            time.sleep(0.05)

    def pid_of(self, what: str) -> int:
        return int(next(line for line in self.lines() if what in line).split()[1])

    def signal(self, sig: signal.Signals, target: str) -> None:
        """target: "script" (the script alone), "group" (its process group) or "every process" (the script
        and every process below it, one by one, parents first: how SLURM signals the processes of a step)."""
        if target == "group":
            os.killpg(self.proc.pid, sig)
        else:
            signal_each([self.proc.pid, *(descendants(self.proc.pid) if target == "every process" else [])], sig)

    def signalled_while_training(self, script: tuple, sig: signal.Signals, target: str) -> tuple[int, str, list]:
        """Starts `script` (its path and options) without the preflight, waits until both workers train,
        signals `target` and returns (exit status, stderr, the fake processes' log lines)."""
        self.start(*script, "--no-preflight", "model=tiny")
        self.wait_for("ready", count=2)
        self.signal(sig, target)
        rc, err = self.finish()
        return rc, err, self.lines()

    def finish(self) -> tuple[int, str]:
        try:
            _, err = self.proc.communicate(timeout=20)
        finally:
            for pid in descendants(self.proc.pid) if self.proc.poll() is None else []:
                os.kill(pid, signal.SIGKILL)  # only what this test started
            if self.proc.poll() is None:
                self.proc.kill()
            self.kill_leftovers()
        return self.proc.returncode, err

    def kill_leftovers(self) -> None:
        """The fake processes that outlived the script (a launcher it did not wait for)."""
        for words in (line.split() for line in self.lines()):
            try:
                if words[1].isdigit() and b"fake_" in Path(f"/proc/{words[1]}/cmdline").read_bytes():
                    os.kill(int(words[1]), signal.SIGKILL)
            except (OSError, IndexError):
                continue  # ended


@pytest.mark.parametrize(
    "sig, target",
    [
        (signal.SIGTERM, "script"),
        (signal.SIGTERM, "group"),
        (signal.SIGTERM, "every process"),
        (signal.SIGUSR1, "script"),
        (signal.SIGUSR1, "every process"),
    ],
)
def test_stop_signal_while_training_reaches_the_workers_and_torchrun_gets_one_sigterm(tmp_path, sig, target):
    launch = Launch(tmp_path)
    rc, err, lines = launch.signalled_while_training(TORCHRUN, sig, target)
    assert rc == 75, (err, lines)
    assert sum(f"saved on {sig.name}" in line for line in lines) == 2, lines
    # torchrun's agent: SIGTERM only from the group / SLURM; SIGUSR1 ignored; never a second SIGTERM
    expected = 1 if sig == signal.SIGTERM and target != "script" else 0
    assert lines.count("agent got SIGTERM") == expected and "agent aborted its shutdown" not in lines
    assert lines[0].endswith("started: SIGUSR1 ignored, SIGINT handled")
    assert launch.status.read_text() == "75\n"


def test_ctrl_c_interrupts_torchrun_once_and_the_script_ends_with_130(tmp_path):
    launch = Launch(tmp_path)
    rc, err, lines = launch.signalled_while_training(TORCHRUN, signal.SIGINT, "group")  # what Ctrl-C does
    assert rc == 130, (err, lines)
    assert lines.count("agent got SIGINT") == 1 and sum("interrupted" in line for line in lines) == 2, lines
    assert launch.status.read_text() == "130\n"


@pytest.mark.parametrize(
    "sig, target",
    [
        (signal.SIGTERM, "script"),
        (signal.SIGTERM, "every process"),
        (signal.SIGUSR1, "script"),
        (signal.SIGUSR1, "every process"),
    ],
)
def test_deepspeed_stop_signal_while_training_reaches_the_workers_and_the_script_waits_for_them(tmp_path, sig, target):
    launch = Launch(tmp_path)
    rc, err, lines = launch.signalled_while_training(DEEPSPEED, sig, target)
    assert rc == 75, (err, lines)
    assert sum(f"saved on {sig.name}" in line for line in lines) == 2, lines
    # launch.py: SIGTERM from SLURM alone (it would SIGKILL the workers 30 s later); SIGUSR1 ignored
    assert lines.count("launch got SIGTERM") == (1 if sig == signal.SIGTERM and target != "script" else 0), lines
    assert [line for line in lines if "started" in line][:2] == [
        f"runner {launch.pid_of('runner')} started: SIGUSR1 ignored",
        f"launch {launch.pid_of('launch')} started: SIGUSR1 ignored",
    ]
    # the script ended after launch.py; the runner ended with the workers' 75 unless SLURM's SIGTERM killed it
    assert f"launch exited {1 if 'launch got SIGTERM' in lines else 75}" in lines, lines
    assert ("runner exited 75" in lines) == (sig == signal.SIGUSR1 or target == "script"), lines
    assert launch.status.read_text() == "75\n"


def test_deepspeed_ctrl_c_interrupts_the_workers_and_the_script_waits_for_launch_py(tmp_path):
    launch = Launch(tmp_path)
    # Ctrl-C: the runner dies of it (KeyboardInterrupt), launch.py handles it
    rc, err, lines = launch.signalled_while_training(DEEPSPEED, signal.SIGINT, "group")
    assert rc == 130, (err, lines)
    assert lines.count("launch got SIGINT") == 1 and sum("interrupted" in line for line in lines) == 2, lines
    assert "launch exited 1" in lines, lines
    assert launch.status.read_text() == "130\n"


@pytest.mark.parametrize(
    "sig, target", [(signal.SIGTERM, "script"), (signal.SIGUSR1, "script"), (signal.SIGTERM, "every process")]
)
def test_deepspeed_stop_signal_while_the_runner_starts_ends_the_script_with_75(tmp_path, sig, target):
    launch = Launch(tmp_path, FAKE_RUNNER_START_SECONDS="60")
    launch.start("launch/deepspeed.sh", "--no-preflight", "model=tiny")
    launch.wait_for("runner")
    runner = launch.pid_of("runner")
    launch.signal(sig, target)
    rc, err = launch.finish()
    assert rc == 75, err
    assert f"{sig.name} before training started: stopping with exit status 75" in err
    assert launch.status.read_text() == "75\n"
    assert ends_soon(runner) and not any("launch" in line for line in launch.lines())


@pytest.mark.parametrize("script", ["launch/torchrun.sh", "launch/deepspeed.sh"])
@pytest.mark.parametrize("sig, target", [(signal.SIGTERM, "script"), (signal.SIGUSR1, "every process")])
def test_stop_signal_during_the_preflight_ends_the_script_with_75(tmp_path, script, sig, target):
    launch = Launch(tmp_path)
    launch.start(script, *(["--nproc-per-node", "2"] if script.endswith("torchrun.sh") else []), "model=tiny")
    launch.wait_for("preflight")
    preflight = launch.pid_of("preflight")
    launch.signal(sig, target)
    rc, err = launch.finish()
    assert rc == 75, err
    assert f"{sig.name} before training started: stopping with exit status 75" in err
    assert launch.status.read_text() == "75\n"  # node 0: the sbatch script requeues on it
    assert ends_soon(preflight) and not any("agent" in line for line in launch.lines())


@pytest.mark.parametrize(
    "sig, target", [(signal.SIGTERM, "script"), (signal.SIGUSR1, "script"), (signal.SIGTERM, "every process")]
)
def test_stop_signal_during_the_rendezvous_ends_the_script_with_75(tmp_path, sig, target):
    launch = Launch(tmp_path, FAKE_RDZV_SECONDS="60")
    launch.start("launch/torchrun.sh", "--nproc-per-node", "2", "--no-preflight", "model=tiny")
    launch.wait_for("agent")
    agent = launch.pid_of("agent")
    launch.signal(sig, target)
    rc, err = launch.finish()
    assert rc == 75, err
    assert "before training started: stopping with exit status 75" in err
    assert launch.status.read_text() == "75\n"
    assert ends_soon(agent) and not any("worker" in line for line in launch.lines())


def test_sigterm_to_workers_still_starting_ends_the_script_with_75(tmp_path):
    """Workers that SIGTERM ends before their handler is in place (the interpreter starting) write no
    status: nothing was trained, and the script ends with 75 as before any worker ran."""
    launch = Launch(tmp_path, FAKE_WORKER_START_SECONDS="60")
    launch.start("launch/torchrun.sh", "--nproc-per-node", "2", "--no-preflight", "model=tiny")
    launch.wait_for("starting", count=2)
    launch.signal(signal.SIGTERM, "script")
    rc, err = launch.finish()
    assert rc == 75, (err, launch.lines())
    assert "SIGTERM before training started: stopping with exit status 75" in err
    assert launch.status.read_text() == "75\n"
    assert not any("ready" in line or "agent got" in line for line in launch.lines())


@pytest.mark.parametrize("target", ["script", "every process"])
def test_sigusr1_to_workers_still_starting_ends_the_script_with_75(tmp_path, target):
    """Workers inherit SIGUSR1 ignored from the agent until the trainer's handler is in place: a SIGUSR1
    (sbatch --signal=USR1@600) then would be lost and the run go on to the time limit. Such workers get
    a SIGTERM instead, which ends them as before any worker ran: nothing was trained, 75."""
    launch = Launch(tmp_path, FAKE_WORKER_START_SECONDS="60")
    launch.start("launch/torchrun.sh", "--nproc-per-node", "2", "--no-preflight", "model=tiny")
    launch.wait_for("starting", count=2)
    assert all(line.endswith("SIGUSR1 ignored") for line in launch.lines() if "starting" in line), launch.lines()
    launch.signal(signal.SIGUSR1, target)
    rc, err = launch.finish()
    assert rc == 75, (err, launch.lines())
    assert "SIGUSR1 before training started: stopping with exit status 75" in err
    assert launch.status.read_text() == "75\n"
    assert not any("ready" in line or "agent got" in line for line in launch.lines())


@pytest.mark.parametrize("phase", ["preflight", "training"])
def test_sbatch_requeues_after_usr1_to_every_process_of_the_step(tmp_path, phase):
    # sbatch --signal=USR1@600: SIGUSR1 to every process of the srun step, not to the batch script
    launch = Launch(tmp_path, **fake_slurm("n1", 1, SLURM_GPUS_ON_NODE="2"))
    del launch.env["RETNET_EXIT_STATUS_FILE"]  # the sbatch script makes its own
    launch.start("launch/slurm/nvidia.sbatch", *(["--no-preflight"] if phase == "training" else []), "model=tiny")
    launch.wait_for("preflight" if phase == "preflight" else "ready", count=1 if phase == "preflight" else 2)
    signal_each(descendants(int((tmp_path / "srun.pid").read_text())), signal.SIGUSR1)
    rc, err = launch.finish()
    assert rc == 75, (err, launch.lines())
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert "requeueing job 4242 to resume" in err
