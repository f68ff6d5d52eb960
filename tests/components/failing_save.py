"""The trainer's command line (python -m retnet_train.train ARGS) with one write of a checkpoint failing on
one rank, for tests under torchrun: $FAILING_SAVE = "RANK:TAG/FILE:KIND" makes rank RANK's torch.save of
<checkpoint.dir>/TAG/FILE (an fnmatch pattern) fail as a full disk or a quota fails it: KIND OSError (the
file cannot be created) or RuntimeError (torch's zip writer, which leaves it cut short). Every other write,
and every other rank, is left alone. Each rank's stderr goes to $FAILING_SAVE_LOGS/rank<R>.stderr: two ranks
printing at once to one pipe can interleave their lines."""

import errno
import fnmatch
import os
import runpy

import torch


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
    log = os.open(
        os.path.join(os.environ["FAILING_SAVE_LOGS"], f"rank{os.environ.get('RANK', 0)}.stderr"),
        os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
        0o644,
    )
    os.dup2(log, 2)
    install(os.environ["FAILING_SAVE"])
    runpy.run_module("retnet_train.train", run_name="__main__", alter_sys=True)
