"""pick_device: train.device resolved on this machine, and a precision that device cannot train in
refused naming the key; on_every_rank: what failed on some ranks raised on every rank alike."""

import pytest
import torch

from retnet_train.components import distributed
from retnet_train.components.distributed import pick_device
from retnet_train.components.rank_errors import SameOnEveryRank


def test_fp16_without_a_gpu_is_refused_naming_deepspeed_precision(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    remedy = "bf16, bf16-mixed and fp32 run on CPU"
    with pytest.raises(ValueError) as exc:
        pick_device("cpu", "fp16")
    assert str(exc.value) == f"deepspeed.precision=fp16 needs a GPU, and train.device=cpu: {remedy}"
    with pytest.raises(ValueError) as exc:
        pick_device("auto", "fp16")
    assert str(exc.value) == (
        f"deepspeed.precision=fp16 needs a GPU, and none is visible (train.device=auto): {remedy}"
    )
    for precision in ("bf16", "bf16-mixed", "fp32"):
        assert pick_device("cpu", precision) == pick_device("auto", precision) == torch.device("cpu")


@pytest.mark.parametrize("backend", ["triton", "fla"])
def test_a_gpu_retention_backend_without_a_gpu_is_refused_naming_the_key(monkeypatch, backend):
    """The model refused it only at its first forward, after the engine was built and the run dir written."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    remedy = "model.retention_backend=auto or torch run on CPU"
    with pytest.raises(ValueError) as exc:
        pick_device("cpu", "fp32", backend)
    assert (
        str(exc.value)
        == f"model.retention_backend={backend} needs a CUDA or ROCm device, and train.device=cpu: {remedy}"
    )
    with pytest.raises(ValueError) as exc:
        pick_device("auto", "bf16", backend)
    assert str(exc.value) == (
        f"model.retention_backend={backend} needs a CUDA or ROCm device, and none is visible (train.device=auto): "
        f"{remedy}"
    )
    for other in ("auto", "torch", None):  # None: a model without retention (the Transformer)
        assert pick_device("cpu", "fp32", other) == pick_device("auto", "fp32", other) == torch.device("cpu")


def test_cpu_init_builds_no_deepspeed_shm_op(tmp_path):
    """DeepSpeed's CPU shared-memory all-reduce (its inference path) is not compiled at a CPU start: it
    cost ~20 s on a fresh machine and printed compiler lines. Collectives still run, through gloo. DeepSpeed's
    CPU device count (asked at every ZeRO-3 gradient reduce-scatter) starts no `numactl` subprocess."""
    import subprocess
    import sys

    code = """
import torch, torch.distributed as dist
import deepspeed.comm.comm as ds_comm
from retnet_train.components.distributed import init_distributed
init_distributed(torch.device("cpu"))
t = torch.ones(2)
dist.all_reduce(t)
print(ds_comm.cdb.shm_comm_op, t.tolist())
import subprocess
def no_subprocess(*args, **kwargs):
    raise AssertionError(f"subprocess {args}")
subprocess.Popen = no_subprocess
from deepspeed.accelerator import get_accelerator
print(get_accelerator().device_count())  # ZeRO-3 asks at every gradient reduce-scatter
"""
    env = {**__import__("os").environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        env.pop(key, None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-2:] == ["None [1.0, 1.0]", "1"]
    assert not (tmp_path / "ext").exists() and "gcc" not in out.stdout + out.stderr


def test_what_failed_on_several_ranks_is_raised_on_every_rank_naming_them(monkeypatch):
    """on_every_rank: every rank raises the same error, naming each rank that failed and why."""
    from retnet_train.components.distributed import on_every_rank

    others = {1: (None, None, None), 2: (None, None, "Disk quota exceeded: /c/rng_rank2.pt"), 3: (None, None, None)}

    def all_gather_object(out, mine):  # rank 0 of 4, ranks 1-3 as given
        out[:] = [mine, *others.values()]

    monkeypatch.setattr(distributed.dist, "all_gather_object", all_gather_object)

    def fails():
        raise OSError(28, "No space left on device", "/c/rng_rank0.pt")

    describe = lambda e: f"{e.strerror}: {e.filename}"  # noqa: E731
    with pytest.raises(OSError) as raised:
        on_every_rank(fails, 4, describe, lambda failed: OSError(None, f"saving failed on {failed}", "/c"))
    assert raised.value.strerror == (
        "saving failed on ranks 0, 2 (rank 0: No space left on device: /c/rng_rank0.pt; "
        "rank 2: Disk quota exceeded: /c/rng_rank2.pt)"
    )
    assert isinstance(raised.value.__cause__, OSError)  # this rank's own, chained
    others[2] = (None, "checkpoint.dir=/c holds step_3, which this trainer did not write", None)
    with pytest.raises(SameOnEveryRank) as raised:  # a refusal: printed once, naming the rank that raised it
        on_every_rank(lambda: 5, 4, describe, OSError)
    assert str(raised.value) == (
        "rank 2 refused (ranks 0, 1, 3 did not): checkpoint.dir=/c holds step_3, which this trainer did not write"
    )
    others[2] = (7, None, None)
    assert on_every_rank(lambda: 5, 4, describe, OSError) == [5, None, 7, None]


def test_refusals_that_differ_between_ranks_name_the_ranks_of_each(monkeypatch):
    """on_every_rank: one refusal every rank raised is raised as it is; refusals that differ name which ranks
    raised which, the ranks of one message together."""
    from retnet_train.components.distributed import on_every_rank

    def refuse(why):
        def refusing():
            raise ValueError(why)

        return refusing

    others = {}

    def all_gather_object(out, mine):  # rank 0 of 4, ranks 1-3 as given
        out[:] = [mine, *others.values()]

    monkeypatch.setattr(distributed.dist, "all_gather_object", all_gather_object)
    others.update({1: (None, "A", None), 2: (None, "A", None), 3: (None, "A", None)})
    with pytest.raises(SameOnEveryRank, match="^A$"):
        on_every_rank(refuse("A"), 4)
    others[2] = (None, "B", None)
    with pytest.raises(
        SameOnEveryRank, match=r"^ranks 0, 1, 2, 3 refused differently \(ranks 0, 1, 3: A; rank 2: B\)$"
    ):
        on_every_rank(refuse("A"), 4)
    others[3] = (None, None, "OSError: gone")
    with pytest.raises(
        SameOnEveryRank, match=r"^ranks 1, 2 refused differently \(ranks 0, 3 did not\) \(rank 1: A; rank 2: B\)$"
    ):
        on_every_rank(lambda: 5, 4)


def test_any_failure_of_a_check_at_start_on_one_rank_is_raised_on_every_rank(monkeypatch):
    """agreed_on_every_rank: not only a refusal (a ValueError) but any Exception of one rank (an OSError, a
    RuntimeError) is raised on every rank as one error naming that rank, its type and message, printed by rank 0
    alone; the other ranks waited in their next collective for it until the launcher killed them."""
    from retnet_train.components.distributed import agreed_on_every_rank
    from retnet_train.components.rank_errors import FailedOnRanks, SharedError

    others = {1: (None, None, "PermissionError: [Errno 13] Permission denied: '/c'")}

    def all_gather_object(out, mine):  # rank 0 of 2, rank 1 as given
        out[:] = [mine, *others.values()]

    monkeypatch.setattr(distributed.dist, "all_gather_object", all_gather_object)
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 0)
    with pytest.raises(FailedOnRanks) as raised:  # rank 0 itself read it fine
        agreed_on_every_rank(lambda: 5, 2, "checking checkpoint.dir=/c")
    assert str(raised.value) == (
        "checking checkpoint.dir=/c failed on rank 1 (PermissionError: [Errno 13] Permission denied: '/c')"
    )
    assert isinstance(raised.value, SharedError)  # printed once, by rank 0

    def broken():
        raise RuntimeError("no such attribute")

    others[1] = (None, None, "RuntimeError: no such attribute")
    with pytest.raises(FailedOnRanks, match=r"^check failed on ranks 0, 1 \(RuntimeError: no such attribute\)$"):
        agreed_on_every_rank(broken, 2, "check")
    others[1] = (7, None, None)
    assert agreed_on_every_rank(lambda: 5, 2, "check") == 5  # this rank's result


def test_ctrl_c_and_exit_in_a_check_at_start_pass_through_at_once(monkeypatch):
    """KeyboardInterrupt (Ctrl-C reaches every rank) and SystemExit are no failure to share: raised as they are,
    without the collective. Alone (world 1) any error is raised as it is."""
    from retnet_train.components.distributed import agreed_on_every_rank

    def no_collective(out, mine):
        raise AssertionError("no collective expected")

    monkeypatch.setattr(distributed.dist, "all_gather_object", no_collective)
    for error in (KeyboardInterrupt(), SystemExit(3)):

        def interrupted(error=error):
            raise error

        with pytest.raises(type(error)):
            agreed_on_every_rank(interrupted, 2, "check")
    with pytest.raises(OSError, match="gone"):
        agreed_on_every_rank(lambda: (_ for _ in ()).throw(OSError("gone")), 1, "check")
