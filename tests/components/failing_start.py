"""The trainer's command line (python -m retnet_train.train ARGS) with the first check at start failing on some
ranks, for tests under torchrun: $FAILING_START = "RANKS:KIND" (RANKS: one rank or several, "0,1") makes those
ranks' look at their checkpoint dir (resume_source.refuse_foreign, the first thing train.resume's check reads) fail
with KIND: OSError (the directory cannot be read there: a mount gone or without permission on one node),
RuntimeError (a bug of that rank's own) or ValueError (a refusal: a file there read damaged, json's error
DAMAGED_JSON). Every other rank is left alone. Each rank's stderr goes to its own file (rank_faults.run_trainer)."""

import errno
import json
import os

from rank_faults import run_trainer

from retnet_train.components import resume_source

DAMAGED_JSON = '{"tag": "step_00000002"'  # a file cut short, as one node's cache of it may be


def install(spec: str) -> None:
    ranks, kind = spec.split(":")
    rank = int(os.environ.get("RANK", 0))
    if rank not in [int(r) for r in ranks.split(",")]:
        return

    def failing(directory: str) -> None:
        if kind == "OSError":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), directory)
        if kind == "ValueError":
            json.loads(DAMAGED_JSON)  # json.JSONDecodeError, a ValueError
        raise RuntimeError(f"rank {rank} looked at {directory} and broke")

    resume_source.refuse_foreign = failing  # resolve_resume calls it by this module's name


if __name__ == "__main__":
    install(os.environ["FAILING_START"])
    run_trainer()
