"""Pretraining entry point (Hydra app; config root configs/config.yaml).

    python -m retnet_train.train experiment=tiny_cpu
    torchrun --nproc_per_node=8 -m retnet_train.train experiment=retnet_1.3b_8k wandb.mode=online
    deepspeed --num_gpus 8 --module retnet_train.train experiment=retnet_1.3b_8k

Exit status: 0 finished (train.max_steps reached); 1 error (the message names the key or file);
75 stopped by SIGTERM or SIGUSR1 after saving a checkpoint, or before the first step (nothing to
save): run the same command again to resume (launch/slurm/*.sbatch requeue the job on it); 130
Ctrl-C (no checkpoint saved: the run goes on from the last one).
"""

from __future__ import annotations

import os
import sys

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from .components.config import TrainConfig, check_values, register
from .components.preemption import PreemptionHandler
from .components.process_exit import end_before_teardown, exit_with
from .components.rank_errors import SameOnEveryRank, SharedError, print_error, process_rank
from .components.typed_config import typed_config

EXIT_FINISHED, EXIT_ERROR = 0, 1
EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): "a temporary failure; the user is invited to retry"
EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, as a shell reports it


def run(cfg: TrainConfig) -> dict:
    """Train per the config; returns the Trainer's summary. For drivers that build or compose a
    TrainConfig themselves; it initializes the process group when none exists."""
    from .trainer import Trainer

    return Trainer(cfg).train()


register()


def _absorb_launcher_args() -> None:
    """The `deepspeed` launcher appends --local_rank=N (unless --no_local_rank): keep it out of
    Hydra's overrides, in the environment where torchrun would have put it."""
    for arg in list(sys.argv[1:]):
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
            sys.argv.remove(arg)


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # imported here, after the stop handler is in place: torch alone takes seconds to import
    import torch.distributed as dist

    from .components.faults import TrainingError

    typed = None
    try:
        refuse_multirun()
        typed = checked_config(cfg)
        summary = run(typed)
    except (ValueError, TrainingError, SharedError) as e:
        print_error(e, process_rank())  # once for all ranks where it is the same on every rank
        finish(EXIT_ERROR)
    except KeyboardInterrupt:
        if process_rank() == 0:
            print(interrupted_line(typed), file=sys.stderr, flush=True)
        finish(EXIT_INTERRUPTED)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    finish(EXIT_PREEMPTED if summary["preempted"] else EXIT_FINISHED)


MULTIRUN = (
    "Hydra multirun (-m, --multirun, hydra.mode=MULTIRUN) is not supported: the trainer runs one config per "
    "process and exits with its status; start one command per config, each with its own run.dir"
)


def asks_for_multirun(argv: list) -> bool:
    """-m, --multirun (or an abbreviation argparse takes for it) or a hydra.mode=MULTIRUN override."""
    for arg in argv:
        if arg == "-m" or (len(arg) >= 3 and "--multirun".startswith(arg)):
            return True
        if arg.lstrip("+").lower() == "hydra.mode=multirun":
            return True
    return False


def refuse_multirun() -> None:
    """Inside a job: a multirun that the command line did not show (hydra.mode in a config file). Each job
    would end the process with its run's status, so the sweep's later jobs would never run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise SameOnEveryRank(MULTIRUN)


def checked_config(cfg: DictConfig) -> TrainConfig:
    """The typed config with its values checked. It comes from the command line alone, the same on every
    rank, and so does any problem with it."""
    from .model import model_config_from_dict

    try:
        typed = typed_config(cfg)
        check_values(typed)  # (the Trainer checks again: run() takes configs built elsewhere)
        model_config_from_dict(typed.model)  # its keys, types and values, before any rank starts building
    except ValueError as e:
        raise SameOnEveryRank(str(e)) from None
    return typed


def main_once_per_error() -> None:
    """main() for the command line. Hydra prints what fails while it composes the config (a key the
    config lacks, say), the same on every rank: ranks other than 0 have it raised (HYDRA_FULL_ERROR)
    and only point at rank 0's."""
    rank = process_rank()
    if asks_for_multirun(sys.argv[1:]):  # before Hydra writes its multirun/ directory and starts a job
        print_error(SameOnEveryRank(MULTIRUN), rank)
        finish(EXIT_ERROR)
    if rank != 0:
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        main()
    except (HydraException, OmegaConfBaseException) as e:
        if rank == 0:
            raise  # HYDRA_FULL_ERROR set by the user: Hydra's traceback
        print_error(SameOnEveryRank(str(e)), rank)
        finish(EXIT_ERROR)


def interrupted_line(cfg: TrainConfig | None) -> str:
    """Ctrl-C saves nothing: where the same command goes on from."""
    from .components.checkpoint_discovery import latest_valid
    from .components.config import checkpoint_dir

    if cfg is None:
        return "interrupted before the config was read: nothing saved"
    directory = checkpoint_dir(cfg)
    tag = latest_valid(directory)
    if tag:
        where = f"goes on from {os.path.join(directory, tag)}"
    elif cfg.train.resume in ("auto", "never"):
        where = "starts fresh (no checkpoint saved yet)"
    else:
        where = f"starts again from train.resume={cfg.train.resume}"
    return f"interrupted, nothing saved: started again with the same command, the run {where}"


def finish(status: int) -> None:
    """Exit with `status`, also written to $RETNET_EXIT_STATUS_FILE when a launcher set it: torchrun
    itself ends with 1 for any failed worker, and launch/torchrun.sh reports the trainer's status."""
    path = os.environ.get("RETNET_EXIT_STATUS_FILE")
    if path:
        try:
            tmp = f"{path}.{os.getpid()}"
            with open(tmp, "w") as f:
                f.write(f"{status}\n")
            os.replace(tmp, path)  # ranks on one node write the same file
        except OSError as e:
            print(f"warning: RETNET_EXIT_STATUS_FILE={path}: {e.strerror}", file=sys.stderr, flush=True)
    exit_with(status)


if __name__ == "__main__":
    end_before_teardown()
    # then: a stop signal from here on is recorded (its default action would kill the process) and the
    # trainer acts on it once it can (components/preemption.py)
    PreemptionHandler()
    _absorb_launcher_args()
    main_once_per_error()
