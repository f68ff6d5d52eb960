"""bench.context_parallel reports the loss of the whole sequence, not rank 0's share of it: under 2 gloo
ranks sharing each sequence, its loss is the one-rank loss of the same batch and model."""

import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from retnet_train.bench.context_parallel import full_loss, make_batch, parse_args
from retnet_train.bench.presets import load_preset
from retnet_train.model import build_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "train"))
from trainer_helpers import REPO, env  # noqa: E402


def test_full_loss_is_the_ranks_shares_summed_over_the_world():
    """Shares 2 x 1.5 / 4 tokens and 2 x 4.5 / 4 (P = 2): the group's mean token loss is 1.5."""
    verdicts = [torch.tensor([1.0, 0.1, 0.75], dtype=torch.float64), torch.tensor([1.0, 0.1, 2.25])]
    assert full_loss(verdicts) == 1.5


def one_rank_loss(T: int, doc_len: int) -> float:
    """The probe's model (seed 0, --set n_layers=2) on its batch of data-parallel rank 0, on one rank."""
    cfg = load_preset("tiny", retention_backend="auto", n_layers=2)
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = make_batch(Namespace(micro_batch=1, doc_len=doc_len), cfg.vocab_size, T, 0, None, torch.device("cpu"))
    with torch.no_grad():
        return float(model(**batch, return_logits=False).loss)


@pytest.mark.slow
def test_context_parallel_loss_matches_one_rank():
    args = ["--preset", "tiny", "--set", "n_layers=2", "--seq-lens", "256", "--context-parallel", "2"]
    args += ["--zero-stage", "1", "--steps", "1", "--warmup", "0", "--doc-len", "50"]  # the loss before any update
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "retnet_train.bench.context_parallel", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
    assert line["seq_len"] == 256 and line["fits"]
    assert line["loss"] == pytest.approx(one_rank_loss(256, 50), abs=2e-4)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--seq-lens", "256,abc"], "argument --seq-lens: not a comma list of integers: '256,abc'"),
        (["--context-parallel", "0"], "argument --context-parallel: needs an integer >= 1: '0'"),
        (["--micro-batch", "0"], "argument --micro-batch: needs an integer >= 1: '0'"),
        (["--steps", "0"], "argument --steps: needs an integer >= 1: '0'"),
        (["--doc-len", "-1"], "argument --doc-len: needs an integer >= 0: '-1'"),
        (["--set", "n_layers"], "--set: 'n_layers' is not KEY=VALUE (a model preset override)"),
        (["--set", "bogus=1"], "--set: model.bogus: unknown key for arch=retnet"),
    ],
)
def test_bad_arguments_are_named_before_torch_distributed_starts(capsys, args, needle):
    """Each of these passed the parser and failed on every rank after the process group started (a
    traceback, or a division by zero steps or ranks)."""
    with pytest.raises(SystemExit) as e:
        parse_args(["--preset", "tiny", *args])
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_seq_lens_parse_to_integers():
    assert parse_args(["--preset", "tiny", "--seq-lens", "256,128"]).seq_lens == [256, 128]
    assert parse_args([]).seq_lens == [8192, 16384, 32768, 65536, 131072]
