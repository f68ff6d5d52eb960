"""Stand-ins for the processes that launch/torchrun.sh starts, for the stop-signal tests; every event goes
to $FAKE_LOG, one line each.

    fake_launcher.py --nproc_per_node=N ...   torchrun's agent: a rendezvous of $FAKE_RDZV_SECONDS with
                                              SIGTERM at its default (torchrun's handlers come with the
                                              workers), then N workers in sessions of their own; on
                                              SIGTERM or SIGINT it signals the workers' groups and waits
                                              for them, and a second SIGTERM aborts it (exit 99), as the
                                              real agent's shutdown is aborted
    fake_launcher.py --worker                 a trainer rank: $FAKE_WORKER_START_SECONDS with the signals
                                              as the agent left them (SIGUSR1 ignored, as real workers
                                              inherit it), then SIGTERM/SIGUSR1 "save" and exit 75,
                                              Ctrl-C exits 130; the status goes to $RETNET_EXIT_STATUS_FILE
    fake_launcher.py --preflight              the preflight: sleeps
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def log(line: str) -> None:
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(f"{line}\n")


def disposition(sig: signal.Signals) -> str:
    handler = signal.getsignal(sig)
    return {signal.SIG_IGN: "ignored", signal.SIG_DFL: "default"}.get(handler, "handled")


def write_status(status: int) -> None:
    path = os.environ["RETNET_EXIT_STATUS_FILE"]
    with open(f"{path}.{os.getpid()}", "w") as f:
        f.write(f"{status}\n")
    os.replace(f"{path}.{os.getpid()}", path)


def worker() -> None:
    log(f"worker {os.getpid()} starting: SIGUSR1 {disposition(signal.SIGUSR1)}")  # as the agent left it
    time.sleep(float(os.environ.get("FAKE_WORKER_START_SECONDS", "0")))  # the interpreter, before any handler
    received: list[str] = []
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: received.append(signal.Signals(signum).name))
    log(f"worker {os.getpid()} ready")
    try:
        while not received:
            time.sleep(0.02)
        time.sleep(0.3)  # the checkpoint
    except KeyboardInterrupt:
        log(f"worker {os.getpid()} interrupted")
        write_status(130)
        sys.exit(130)
    log(f"worker {os.getpid()} saved on {received[0]}")
    write_status(75)
    sys.exit(75)


def agent(args: list[str]) -> None:
    nproc = int(next(a for a in args if a.startswith("--nproc_per_node=")).split("=")[1])
    log(f"agent {os.getpid()} started: SIGUSR1 {disposition(signal.SIGUSR1)}, SIGINT {disposition(signal.SIGINT)}")
    time.sleep(float(os.environ.get("FAKE_RDZV_SECONDS", "0")))
    seen: list[str] = []

    # The handler only records: an exception raised from it could land inside Popen.poll() after its
    # internal lock was taken and before it was released, and every later wait() would then time out.
    def on_signal(signum, frame):
        seen.append(signal.Signals(signum).name)
        log(f"agent got {seen[-1]}")
        if seen.count("SIGTERM") > 1:
            log("agent aborted its shutdown")
            os._exit(99)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker"]
    workers = [subprocess.Popen(cmd, start_new_session=True) for _ in range(nproc)]
    while not seen and any(w.poll() is None for w in workers):
        time.sleep(0.02)
    if seen:  # shut down: the first signal goes on to the workers' groups
        for w in workers:
            try:
                os.killpg(w.pid, signal.Signals[seen[0]])
            except ProcessLookupError:
                pass
        for w in workers:
            w.wait(timeout=30)
        sys.exit(1)
    sys.exit(1 if any(w.returncode for w in workers) else 0)


def preflight() -> None:
    log(f"preflight {os.getpid()} started: SIGTERM {disposition(signal.SIGTERM)}")
    time.sleep(60)


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        worker()
    elif sys.argv[1:2] == ["--preflight"]:
        preflight()
    else:
        agent(sys.argv[1:])
