"""The trainer's command line (python -m retnet_train.train ARGS) with the first check at start failing on one
rank alone, for tests under torchrun: $FAILING_START = "RANK:KIND" makes rank RANK's look at its checkpoint dir
(checkpoint.refuse_foreign, the first thing train.resume's check reads) fail with KIND: OSError (the directory
cannot be read there: a mount gone or without permission on one node) or RuntimeError (a bug of that rank's own).
Every other rank is left alone. Each rank's stderr goes to its own file (rank_faults.run_trainer)."""

import errno
import os

from rank_faults import run_trainer

from retnet_train.components import checkpoint


def install(spec: str) -> None:
    rank, kind = spec.split(":")
    if int(os.environ.get("RANK", 0)) != int(rank):
        return

    def failing(directory: str) -> None:
        if kind == "OSError":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), directory)
        raise RuntimeError(f"rank {rank} looked at {directory} and broke")

    checkpoint.refuse_foreign = failing  # resolve_resume calls it by this module's name


if __name__ == "__main__":
    install(os.environ["FAILING_START"])
    run_trainer()
