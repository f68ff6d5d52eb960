"""The device and the process group a run uses, and what its ranks agree on in one collective."""

from __future__ import annotations

import os
from typing import Callable, List, Optional, Tuple, TypeVar

import torch
import torch.distributed as dist

from .rank_errors import FailedOnRanks, SameOnEveryRank

T = TypeVar("T")


def pick_device(choice: str, precision: str, retention_backend: Optional[str] = None) -> torch.device:
    """train.device (auto | cpu | cuda) -> this rank's device, which must train in deepspeed.precision and run
    model.retention_backend."""
    problem = precision_problem(choice, precision) or backend_problem(choice, retention_backend)
    if problem:
        # train.device=cpu makes it the config's problem, every rank's alike (printed once, by rank 0); with
        # auto it is this machine's, which another node may not share
        raise (SameOnEveryRank if choice == "cpu" else ValueError)(problem)
    if _on_gpu(choice):
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but no CUDA/ROCm device is visible")
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _on_gpu(choice: str) -> bool:
    """Whether train.device (auto: resolved on this machine) is a GPU."""
    return choice == "cuda" or (choice == "auto" and torch.cuda.is_available())


def _why_cpu(choice: str) -> str:
    return "train.device=cpu" if choice == "cpu" else "none is visible (train.device=auto)"


def precision_problem(choice: str, precision: str) -> Optional[str]:
    """fp16 where train.device (auto: resolved on this machine) is the CPU, on which DeepSpeed has no fp16."""
    if precision != "fp16" or _on_gpu(choice):
        return None
    return f"deepspeed.precision=fp16 needs a GPU, and {_why_cpu(choice)}: bf16, bf16-mixed and fp32 run on CPU"


def backend_problem(choice: str, retention_backend: Optional[str]) -> Optional[str]:
    """A GPU retention backend (triton, fla) where train.device is the CPU: the model would refuse it only at
    its first forward, after the engine is built and the run directory written."""
    from ..kernels import GPU_BACKENDS

    if retention_backend not in GPU_BACKENDS or _on_gpu(choice):
        return None
    return (
        f"model.retention_backend={retention_backend} needs a CUDA or ROCm device, and {_why_cpu(choice)}: "
        "model.retention_backend=auto or torch run on CPU"
    )


def init_distributed(device: torch.device, timeout=None) -> None:
    """NCCL on GPU, gloo on CPU; `timeout` (a timedelta) for collectives, else the defaults. An
    existing process group is used as it is (several runs in one process)."""
    import deepspeed

    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {} if timeout is None else {"timeout": timeout}
    if not dist.is_initialized() and "RANK" not in os.environ:
        # A plain `python -m`: a world of one on an in-memory store, so no TCP port can collide
        # with another run on the machine.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    if device.type == "cpu":
        _skip_shm_comm_build()
        _pin_cpu_local_size()
    deepspeed.init_distributed(dist_backend=backend, **kwargs)  # wraps the group above, or joins torchrun's


def _skip_shm_comm_build() -> None:
    """On CPU, DeepSpeed's init_distributed compiles a C++ shared-memory all-reduce (~20 s on a fresh
    machine, compiler lines in the log) that only its inference all-reduce uses; training's collectives
    go through torch.distributed (gloo), and without the op that all-reduce falls back to it too."""
    import importlib

    ds_comm = importlib.import_module("deepspeed.comm.torch")  # (the package's `torch` attribute is torch)
    if hasattr(ds_comm, "build_shm_op"):
        ds_comm.build_shm_op = lambda: None


def _pin_cpu_local_size() -> None:
    """On CPU, DeepSpeed counts a node's devices from LOCAL_SIZE (its own launcher sets it), else by running
    `numactl --hardware`, and ZeRO-3 asks for that count at every gradient reduce-scatter: a subprocess per
    bucket per step, whose start also resets Python's once-only warnings (torch's deprecation warnings of the
    collectives were printed every step). LOCAL_SIZE is the launcher's LOCAL_WORLD_SIZE (the same count; one
    inherited from another process does not override it), else 1 unless set."""
    if os.environ.get("LOCAL_WORLD_SIZE"):
        os.environ["LOCAL_SIZE"] = os.environ["LOCAL_WORLD_SIZE"]
    else:
        os.environ.setdefault("LOCAL_SIZE", "1")


def raise_first_problem(problem: Optional[str], world: int) -> None:
    """Every rank raises the first rank's problem, as a SameOnEveryRank (a ValueError, printed by rank 0
    alone; a collective: a rank that failed alone would leave the others waiting in the next one)."""
    problems = [None] * world
    dist.all_gather_object(problems, problem)
    first = next(filter(None, problems), None)
    if first:
        raise SameOnEveryRank(first)


def on_every_rank(
    compute: Callable[[], T],
    world: int,
    describe: Callable[[Exception], str] = lambda e: f"{type(e).__name__}: {e}",
    failure: Callable[[str], Exception] = FailedOnRanks,
) -> List[T]:
    """compute() on every rank of a world of `world` ranks, then every rank's result, in rank order, on every rank
    (one collective). What compute raised on some ranks is raised on every rank alike, where a rank raising alone
    would leave the others waiting for it in their next collective until the launcher kills them; rank 0 alone
    prints it (rank_errors.SharedError): a ValueError (a refusal) as a SameOnEveryRank, as it is where every rank
    raised it alike, else naming which ranks raised which (_refusals); any other Exception as failure('rank 1
    (why)' or 'ranks 0, 1 (rank 0: why; rank 1: why)', each why from describe(exception): its type and message
    unless given), chained from this rank's own. KeyboardInterrupt and
    SystemExit pass through at once: Ctrl-C reaches every rank, and a rank that exits ends the launch. Alone
    (world 1), what compute raises is raised as it is."""
    if world == 1:
        return [compute()]
    result, refusal, why, error = None, None, None, None
    try:
        result = compute()
    except ValueError as e:
        refusal, error = str(e), e
    except Exception as e:  # noqa: BLE001 (every rank raises it below)
        why, error = describe(e), e
    everyone = [None] * world
    dist.all_gather_object(everyone, (result, refusal, why))
    refusals = [(rank, refusal) for rank, (_, refusal, _) in enumerate(everyone) if refusal]
    if refusals:
        raise SameOnEveryRank(_refusals(refusals, world)) from error
    failed = [(rank, why) for rank, (_, _, why) in enumerate(everyone) if why]
    if failed:
        raise failure(_ranks_and_why(failed)) from error
    return [result for result, _, _ in everyone]


def agreed_on_every_rank(compute: Callable[[], T], world: int, what: str) -> T:
    """on_every_rank for a check at start of what every rank reads alike (the config, shared files): this rank's
    result. Any other failure is raised on every rank as '<what> failed on rank 1 (<type>: <message>)'."""
    results = on_every_rank(compute, world, failure=lambda failed: FailedOnRanks(f"{what} failed on {failed}"))
    return results[dist.get_rank() if world > 1 else 0]


def _ranks_and_why(failed: List[Tuple[int, str]]) -> str:
    """'rank 1 (why)', or 'ranks 0, 1 (rank 0: why; rank 1: why)' (the first 3 reasons), 'ranks 0, 1 (why)' where
    every rank's is the same; the first 16 ranks."""
    ranks = _rank_list([rank for rank, _ in failed])
    if len({why for _, why in failed}) == 1:
        return f"{ranks} ({failed[0][1]})"
    reasons = "; ".join(f"rank {rank}: {why}" for rank, why in failed[:3]) + "; ..." * (len(failed) > 3)
    return f"{ranks} ({reasons})"


def _refusals(refused: List[Tuple[int, str]], world: int) -> str:
    """The refusal every rank raised alike, as it is. Else which ranks raised which (a file one rank reads damaged
    is not every rank's refusal): 'rank 1 refused (rank 0 did not): why', or 'ranks 0, 1 refused differently (rank
    0: why; rank 1: why)', ranks of one message together (the first 3 messages)."""
    if len(refused) == world and len({why for _, why in refused}) == 1:
        return refused[0][1]
    groups: dict = {}  # message -> its ranks, in rank order
    for rank, why in refused:
        groups.setdefault(why, []).append(rank)
    others = sorted(set(range(world)) - {rank for rank, _ in refused})
    rest = f" ({_rank_list(others)} did not)" if others else ""
    ranks = _rank_list([rank for rank, _ in refused])
    if len(groups) == 1:
        return f"{ranks} refused{rest}: {refused[0][1]}"
    shown = list(groups.items())[:3]
    reasons = "; ".join(f"{_rank_list(rs)}: {why}" for why, rs in shown) + "; ..." * (len(groups) > 3)
    return f"{ranks} refused differently{rest} ({reasons})"


def _rank_list(ranks: List[int]) -> str:
    """'rank 1', 'ranks 0, 1', the first 16 ranks: 'ranks 0, ..., 15 and 3 more'."""
    more = f" and {len(ranks) - 16} more" * (len(ranks) > 16)
    return f"rank{'s' * (len(ranks) > 1)} " + ", ".join(str(rank) for rank in ranks[:16]) + more


def all_reduce_step(
    losses: list, update_applied: bool, stop_received: bool, device: torch.device
) -> Tuple[bool, bool, float, bool]:
    """What every rank saw in one optimizer step, in one all-reduce (no host sync per micro-batch):
    (a non-finite loss on some rank, an update skipped on some rank (non-finite gradient norm), the
    sum over ranks of each rank's mean loss over its micro-batches (non-finite ones as 0), a stop
    signal on some rank). losses: this rank's micro-batch losses, 0-d tensors."""
    losses_t = torch.stack(losses)
    flags = torch.stack(
        [
            (~torch.isfinite(losses_t)).any().float(),
            torch.tensor(0.0 if update_applied else 1.0, device=device),
            torch.nan_to_num(losses_t.mean(), nan=0.0, posinf=0.0, neginf=0.0),
            torch.tensor(1.0 if stop_received else 0.0, device=device),
        ]
    )
    dist.all_reduce(flags)
    loss_bad, update_skipped, loss_sum, stop = flags.tolist()
    return loss_bad > 0, update_skipped > 0, loss_sum, stop > 0


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on some rank (one all-reduce)."""
    count = torch.tensor(1.0 if flag else 0.0, device=device)
    dist.all_reduce(count)
    return count.item() > 0
