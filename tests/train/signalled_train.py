"""python signalled_train.py WHERE SIGNAL [hydra overrides ...]: the trainer's command line
(`python -m retnet_train.train`), with SIGNAL sent to this process when the trainer calls WHERE (a
function retnet_train.trainer_setup imports: build_model, load_checkpoint), just before it runs: a signal
that arrives while the run is being built or its checkpoint is being loaded. Under torchrun only the
rank in $SIGNAL_RANK signals itself, when that is set."""

import os
import runpy
import signal
import sys

import retnet_train.trainer_setup as trainer_setup


def signal_before(where: str, sig: signal.Signals) -> None:
    original = getattr(trainer_setup, where)

    def signalled(*args, **kwargs):
        if os.environ.get("SIGNAL_RANK", os.environ.get("RANK", "0")) == os.environ.get("RANK", "0"):
            os.kill(os.getpid(), sig)
        return original(*args, **kwargs)

    setattr(trainer_setup, where, signalled)


if __name__ == "__main__":
    signal_before(sys.argv[1], signal.Signals[sys.argv[2]])
    sys.argv = [sys.argv[0], *sys.argv[3:]]
    runpy.run_module("retnet_train.train", run_name="__main__", alter_sys=True)
