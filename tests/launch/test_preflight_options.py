"""retnet_train.preflight's options and where they come from: bad arguments, the launchers'
environments (--from-launcher-env, --dist-check, PREFLIGHT_SHARED_TIMEOUT)."""

from __future__ import annotations

import pytest
from preflight_helpers import cli

from retnet_train import preflight as pf


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--params", "many"], "--params 'many': not a number"),
        (["--params", "0"], "--params '0': must be a positive parameter count"),
        (["--params", "nan"], "--params 'nan': must be a positive parameter count"),
        (["--no-config", "--", "model=nope"], "override model=nope: no preset"),
        (["--", "model=nope"], "Could not find 'model/nope'"),
        (["--", "train.no_such_key=1"], "train.no_such_key"),
        (["--nnodes", "2", "--checkpoint-dir", "/x", "--node-rank", "2"], "--node-rank=2 must be in [0, 1]"),
        (["--nnodes", "2", "--no-config"], "--nnodes=2 needs --checkpoint-dir"),
        (["--keep-checkpoints", "0"], "--keep-checkpoints=0 must be >= 1"),
        (["--shared-id", "a/b"], "--shared-id='a/b' may only contain"),
        (["--nproc-per-node", "0"], "--nproc-per-node=0 must be >= 1"),
    ],
)
def test_bad_arguments(args, fragment, capsys):
    assert pf.main(args) == 2
    assert fragment in capsys.readouterr().err


def test_launcher_environments():
    p = pf.build_parser()
    args = p.parse_args([])
    assert pf.apply_launcher_env(
        args, {"LOCAL_RANK": "0", "CROSS_RANK": "2", "CROSS_SIZE": "4", "LOCAL_SIZE": "8", "WORLD_SIZE": "32"}
    )
    assert (args.node_rank, args.nnodes, args.nproc_per_node, args.world_size) == (2, 4, 8, 32)
    args = p.parse_args([])
    assert pf.apply_launcher_env(
        args,
        {"LOCAL_RANK": "0", "GROUP_RANK": "1", "GROUP_WORLD_SIZE": "2", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"},
    )
    assert (args.node_rank, args.nnodes, args.nproc_per_node, args.world_size) == (1, 2, 8, 16)
    assert not pf.apply_launcher_env(p.parse_args([]), {"LOCAL_RANK": "3", "CROSS_RANK": "0"})
    with pytest.raises(pf.PreflightError, match="LOCAL_RANK is unset"):
        pf.apply_launcher_env(p.parse_args([]), {})
    with pytest.raises(pf.PreflightError, match="neither CROSS_RANK"):
        pf.apply_launcher_env(p.parse_args([]), {"LOCAL_RANK": "0"})
    with pytest.raises(pf.PreflightError, match="CROSS_SIZE='x' is not an integer"):
        pf.apply_launcher_env(p.parse_args([]), {"LOCAL_RANK": "0", "CROSS_RANK": "0", "CROSS_SIZE": "x"})


def test_launcher_processes_other_than_local_rank_0_check_nothing(monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert pf.main(["--from-launcher-env", "--nnodes", "0"]) == 0  # not even the options are checked
    assert capsys.readouterr() == ("", "")


def test_dist_check_outside_a_launcher_names_the_missing_variable():
    r = cli("--dist-check", unset=("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"), timeout=60)
    assert r.returncode == 2 and "RANK is unset: run under torchrun" in r.stderr


def test_shared_timeout_from_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("PREFLIGHT_SHARED_TIMEOUT", "soon")
    assert pf.main(["--nnodes", "2", "--checkpoint-dir", "/tmp", "--no-config"]) == 2
    assert "PREFLIGHT_SHARED_TIMEOUT='soon' is not a number of seconds" in capsys.readouterr().err
    monkeypatch.setenv("PREFLIGHT_SHARED_TIMEOUT", "7.5")
    args = pf.build_parser().parse_args([])
    pf._validate(args)
    assert args.shared_timeout == 7.5


def test_under_torchrun_the_world_size_and_node_count_are_torchruns_with_uneven_nodes():
    """8 + 4 GPUs: torchrun's WORLD_SIZE (12) is the world size and GROUP_WORLD_SIZE (2) the node count;
    WORLD_SIZE // LOCAL_WORLD_SIZE would give 1 node on the first and 3 on the second."""
    p = pf.build_parser()
    views = []
    for rank, local in ((0, "8"), (1, "4")):
        args = p.parse_args([])
        env = {"LOCAL_RANK": "0", "GROUP_RANK": str(rank), "GROUP_WORLD_SIZE": "2", "WORLD_SIZE": "12"}
        assert pf.apply_launcher_env(args, {**env, "LOCAL_WORLD_SIZE": local})
        views.append((args.node_rank, args.nnodes, args.nproc_per_node, args.world_size))
    assert views == [(0, 2, 8, 12), (1, 2, 4, 12)]


def test_world_size_option_is_checked():
    for argv, fragment in [
        (["--world-size", "0"], "--world-size=0 must be >= 1"),
        (["--nnodes", "2", "--checkpoint-dir", "/x", "--world-size", "1"], "--world-size=1 is less than --nnodes=2"),
        (["--nproc-per-node", "8", "--world-size", "4"], "--world-size=4 is less than --nproc-per-node=8"),
    ]:
        with pytest.raises(pf.PreflightError, match=fragment.replace("-", "\\-")):
            pf._validate(pf.build_parser().parse_args(argv))
