"""Worker for trainer_helpers.run_scenarios: several trainer runs, one after another, in one process
per rank (under torchrun for more than one rank). Each run is composed from its Hydra overrides as
`python -m retnet_train.train` would compose them and goes through retnet_train.train.run, the
function the CLI calls; the process group, torch and DeepSpeed are set up once for all of them.

Usage: python run_scenarios.py SPEC.json, SPEC = [{"name", "args", "out", "expect_error"}, ...].
Per scenario and rank, <out>/rank<R>.stdout and .stderr get that run's output (file descriptors 1
and 2: DeepSpeed's and torch's messages too) and <out>/rank<R>.json
{"summary": run's return value} or {"error": exception type, "message": ...}. An exception a
scenario does not expect ends the job (the other ranks would wait for it in a collective)."""

import json
import os
import sys
import time
import traceback
from pathlib import Path


def redirect(stdout_path, stderr_path):
    """Point fds 1 and 2 at two files; returns what restore() needs."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    for target, path in ((1, stdout_path), (2, stderr_path)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, target)
        os.close(fd)
    return saved


def restore(saved):
    sys.stdout.flush()
    sys.stderr.flush()
    for target, fd in zip((1, 2), saved):
        os.dup2(fd, target)
        os.close(fd)


def main(run_one=None) -> None:
    """run_one(cfg, out): what each scenario does with its TrainConfig and output directory, its return
    value the scenario's summary; by default retnet_train.train.run(cfg). A worker script of its own
    (trainer_helpers.run_scenarios' script) passes another."""
    import torch.distributed as dist

    from retnet_train.components.process_exit import exit_with
    from retnet_train.components.typed_config import typed_config  # as the CLI converts it
    from retnet_train.preflight import compose_trainer_config  # composes as the CLI does
    from retnet_train.train import run

    spec = json.loads(Path(sys.argv[1]).read_text())
    rank = int(os.environ.get("RANK", 0))
    for scenario in spec:
        out = Path(scenario["out"])
        out.mkdir(parents=True, exist_ok=True)
        saved = redirect(out / f"rank{rank}.stdout", out / f"rank{rank}.stderr")
        began = time.time()
        try:
            cfg = typed_config(compose_trainer_config(scenario["args"]))
            result = {"summary": run(cfg) if run_one is None else run_one(cfg, out)}
        except Exception as e:  # noqa: BLE001 (recorded for the test, or ends the job)
            traceback.print_exc()
            result = {"error": type(e).__name__, "message": str(e)}
        finally:
            restore(saved)
        (out / f"rank{rank}.json").write_text(json.dumps(result))
        if "error" in result and result["error"] != scenario.get("expect_error"):
            print(f"scenario {scenario['name']} failed: see {out}/rank{rank}.stderr", file=sys.stderr, flush=True)
            os._exit(1)
        print(
            f"scenario {scenario['name']}: {'error ' + result['error'] if 'error' in result else 'done'} "
            f"in {time.time() - began:.1f} s",
            flush=True,
        )
    if dist.is_initialized():
        dist.destroy_process_group()
    exit_with(0)  # ends as the CLI does, without the interpreter teardown that a Gloo thread can abort


if __name__ == "__main__":
    from retnet_train.components.process_exit import end_before_teardown

    end_before_teardown()
    main()
