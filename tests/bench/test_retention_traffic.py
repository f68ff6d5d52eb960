"""The triton retention passes' byte counts and their pairing with profiled kernel times."""

import subprocess
import sys
from pathlib import Path

import pytest

from retnet_train.bench.retention_traffic import pass_table, triton_passes


def test_forward_output_pass_reads_q_v_states_scores_and_writes_o():
    """B 1, T 8, H 1, K 2, V 4, chunk 4, bf16: q 32 B, v 64, S (2 chunks x 2 x 4) 32, A (8 x 4) 64, o 64."""
    passes = dict((label, nbytes) for label, _, nbytes in triton_passes(1, 8, 1, 2, 4, 4))
    assert passes["forward: output o"] == 32 + 64 + 32 + 64 + 64
    # the scan: k 32 + v 64 read; S 32 (bf16), z 2 chunks x 2 x 4 = 16, final state 8 x 4 = 32 + its z 8
    assert passes["forward: states scan"] == 32 + 64 + 32 + 16 + 32 + 8
    # the backward's pair: q, k, v, dO read; S and dG written; two fp32 final states
    assert passes["backward: both state scans"] == 2 * 32 + 2 * 64 + 2 * 32 + 2 * 32


def test_backward_passes_read_and_write_each_tensor_once():
    """B 1, T 8, H 1, K 2, V 4, chunk 4, bf16: q/k/dq/dk 32 B, v/dO/dv 64, S or dG 32, A or dA 64. dq and dk
    each read dO, q or k, the states and dA and write their gradient; dv reads q, dO, the states and A."""
    passes = dict((label, nbytes) for label, _, nbytes in triton_passes(1, 8, 1, 2, 4, 4))
    qk, vo, states, scores = 32, 64, 32, 64
    assert passes["backward: scores dO v"] == 2 * vo + scores
    assert passes["backward: dq"] == vo + qk + states + scores + qk
    assert passes["backward: dk"] == vo + qk + states + scores + qk
    assert passes["backward: scores q k"] == 2 * qk + scores
    assert passes["backward: dv"] == qk + vo + states + scores + vo
    # the forward's scores: q, k read, A written, fp32 row sums (8 tokens x 4 // 16 = 0 per row here), z
    assert passes["forward: scores q k (row sums)"] == 2 * qk + scores + 0 + 16


def test_segments_add_the_carry_pass_after_the_scan():
    one = [kind for _, kind, _ in triton_passes(1, 8192, 8, 256, 512, 256, segments=1)]
    two = triton_passes(1, 8192, 8, 256, 512, 256, segments=2)
    assert one == ["states", "scores", "apply", "states_pair", "scores", "apply", "apply", "scores", "apply"]
    assert [kind for _, kind, _ in two] == one[:1] + ["carry"] + one[1:]
    # the later 16 chunks' bf16 states read and written (67.1 MB each way for all 32), + fp32 finals
    carry = two[1][2]
    assert carry == 2 * 8 * 16 * 256 * 512 * 2 + 2 * 8 * 256 * 512 * 4 + 2 * 8 * 256 * 512 * 4


def test_the_byte_model_runs_without_triton():
    """The passes (their scan segments included: kernels/scan_split.py) come without importing triton."""
    code = (
        "import sys; sys.modules['triton'] = None\n"  # any import of triton raises
        "from retnet_train.bench.retention_traffic import triton_passes\n"
        "kinds = [kind for _, kind, _ in triton_passes(1, 1280, 8, 256, 512, 256, segments=4)]\n"
        "assert kinds[:2] == ['states', 'carry'], kinds"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_pass_table_pairs_retention_kernels_in_launch_order_and_skips_others():
    passes = triton_passes(1, 8, 1, 2, 4, 4)
    names = ["_states_kernel", "_scores_kernel", "_apply_kernel", "_states_pair_kernel"]
    names += ["_scores_kernel", "_apply_kernel", "_apply_kernel", "_scores_kernel", "_apply_kernel"]
    kernels = [["memset (zeros)", 1.0]] + [[n, 2.0] for n in names] + [["cat", 3.0]]
    rows = pass_table(passes, kernels)
    assert [r["pass"] for r in rows] == [label for label, _, _ in passes]
    assert rows[2] == {"pass": "forward: output o", "us": 2.0, "mb": 0.0, "tb_per_s": 0.0}
    big = pass_table(triton_passes(1, 8192, 8, 256, 512, 256), [[n, 100.0] for n in names])
    assert big[2]["mb"] == 268.4 and big[2]["tb_per_s"] == 2.68  # 268.4 MB in 100 us


def test_pass_table_refuses_kernels_that_do_not_line_up():
    with pytest.raises(ValueError, match="are not the passes"):
        pass_table(triton_passes(1, 8, 1, 2, 4, 4), [["_states_kernel", 1.0], ["_apply_kernel", 1.0]])


@pytest.mark.gpu
@pytest.mark.parametrize("segments", ["auto", "1"])
def test_profiled_triton_kernels_line_up_with_the_passes(capsys, monkeypatch, segments):
    """The real kernels of one forward + backward at a small shape, one per modelled pass: the forward
    scan in segments (auto: 4 here, few programs) and in one."""
    import json

    from retnet_train.bench import retention_kernels
    from retnet_train.kernels import triton_retention_launch

    monkeypatch.setattr(triton_retention_launch, "SCAN_SEGMENTS", segments)
    args = ["--dims", "64x128", "--heads", "2", "--seq-len", "1024", "--backends", "triton@64"]
    retention_kernels.main(args + ["--steps", "2", "--profile"])
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert isinstance(row["passes"], list), row["passes"]
    assert len(row["passes"]) == (10 if segments == "auto" else 9)
    assert all(p["us"] > 0 and p["mb"] > 0 for p in row["passes"])
