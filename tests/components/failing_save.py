"""The trainer's command line (python -m retnet_train.train ARGS) with one write of a checkpoint failing on
one rank, for tests under torchrun: $FAILING_SAVE = "RANK:TAG/FILE:KIND" makes rank RANK's torch.save of
<checkpoint.dir>/TAG/FILE (an fnmatch pattern) fail as a full disk or a quota fails it: KIND OSError (the
file cannot be created) or RuntimeError (torch's zip writer, which leaves it cut short). Every other write,
and every other rank, is left alone. Each rank's stderr goes to its own file (rank_faults.run_trainer)."""

import errno
import fnmatch
import os

import torch
from rank_faults import run_trainer


def install(spec: str) -> None:
    rank, where, kind = spec.split(":")
    if int(os.environ.get("RANK", 0)) != int(rank):
        return
    tag, pattern = where.split("/")
    save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        path = os.fspath(f) if isinstance(f, (str, os.PathLike)) else ""
        if os.path.basename(os.path.dirname(path)) == tag and fnmatch.fnmatch(os.path.basename(path), pattern):
            if kind == "OSError":
                raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), path)
            with open(path, "wb") as cut:
                cut.write(b"PK\x03\x04")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")
        return save(obj, f, *args, **kwargs)

    torch.save = failing_save  # DeepSpeed's checkpoint engine and the trainer's RNG states both call it


if __name__ == "__main__":
    install(os.environ["FAILING_SAVE"])
    run_trainer()
