"""Stand-ins for the processes that launch/deepspeed.sh starts on one node (no hostfile), for the
stop-signal tests; they do with the signals what DeepSpeed's do (deepspeed/launcher/runner.py and
launch.py), and log to $FAKE_LOG as fake_launcher.py does.

    fake_deepspeed.py --runner    the runner: $FAKE_RUNNER_START_SECONDS (its imports), then launch.py
                                  as its child, waited for; no handler of its own (SIGTERM and SIGUSR1
                                  at their defaults, Ctrl-C a KeyboardInterrupt); ends with launch.py's
                                  status when it is > 0, else 0
    fake_deepspeed.py -m deepspeed.launcher.launch
                                  launch.py: 2 workers (fake_launcher.py --worker) in its own process
                                  group; on SIGTERM or SIGINT it SIGTERMs the workers, waits for them
                                  and exits 1; a worker that fails makes it SIGTERM the
                                  others and exit with that worker's status
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from fake_launcher import disposition, log

LAUNCH = ["-m", "deepspeed.launcher.launch"]


def runner() -> None:
    log(f"runner {os.getpid()} started: SIGUSR1 {disposition(signal.SIGUSR1)}")
    time.sleep(float(os.environ.get("FAKE_RUNNER_START_SECONDS", "0")))
    result = subprocess.Popen([sys.executable, "-u", os.path.abspath(__file__), *LAUNCH])
    result.wait()
    log(f"runner exited {result.returncode}")
    if result.returncode > 0:
        sys.exit(result.returncode)


def launch() -> None:
    log(f"launch {os.getpid()} started: SIGUSR1 {disposition(signal.SIGUSR1)}")
    cmd = [sys.executable, "-u", os.path.join(os.path.dirname(__file__), "fake_launcher.py"), "--worker"]
    workers = [subprocess.Popen(cmd) for _ in range(2)]
    last_return_code = None

    def stop_workers():
        for w in workers:
            if w.poll() is None:
                w.terminate()
        for w in workers:
            w.wait(timeout=30)
        log(f"launch exited {last_return_code or 1}")
        sys.exit(last_return_code or 1)

    # The handler only records (launch.py stops the workers from its handler; here that would race with
    # the loop's Popen.poll(), whose internal lock a signal can leave taken, and every wait() time out).
    got: list[str] = []

    def on_signal(signum, frame):
        got.append(signal.Signals(signum).name)
        log(f"launch got {got[-1]}")

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    alive = set(workers)
    while alive and not got:
        for w in list(alive):
            if w.poll() is None:
                continue
            if w.returncode != 0:
                last_return_code = w.returncode
                stop_workers()
            alive.discard(w)
        time.sleep(0.1)
    if got:
        stop_workers()
    log("launch exited 0")


if __name__ == "__main__":
    if sys.argv[1:3] == LAUNCH:
        launch()
    else:
        runner()
