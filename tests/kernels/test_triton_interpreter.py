"""Triton kernels vs the torch reference on CPU, under Triton's interpreter: every case runs in one
fresh subprocess (triton_interpreter.py says why); each test reports its own case."""

import pytest
from triton_interpreter import run_cases


@pytest.fixture(scope="module")
def interpreter_results():
    """{case: None if it passed, else its traceback}, for every case at once."""
    pytest.importorskip("triton")
    return run_cases()


def in_subprocess(results, case, *args):
    err = results[" ".join(map(str, (case, *args)))]
    assert err is None, err


@pytest.mark.parametrize("B,T,H,K,V,C", [(2, 80, 2, 32, 64, 32), (1, 128, 2, 64, 128, 64)])
def test_triton_interpreter_matches_torch(interpreter_results, B, T, H, K, V, C):
    in_subprocess(interpreter_results, "check_matches_torch", B, T, H, K, V, C)


def test_triton_interpreter_blocks_resets_state(interpreter_results):
    """Several row blocks per chunk, column tiles, a partial last chunk, resets and an incoming state."""
    in_subprocess(interpreter_results, "check_blocks_resets_state")


def test_triton_interpreter_resets_without_row_sums(interpreter_results):
    in_subprocess(interpreter_results, "check_resets_only_and_no_row_sums")


def test_triton_interpreter_prefill_continues(interpreter_results):
    in_subprocess(interpreter_results, "check_prefill_continues")


def test_triton_interpreter_small_decay(interpreter_results):
    """A decay whose centred split would overflow takes the elementwise path (with column blocks
    narrower than the row blocks)."""
    in_subprocess(interpreter_results, "check_small_decay")


def test_triton_interpreter_bf16(interpreter_results):
    in_subprocess(interpreter_results, "check_bf16")


def test_triton_interpreter_gpu_tiles(interpreter_results):
    """The GPU's autotuned block shapes, every head dim over several tiles, each kernel on its own."""
    in_subprocess(interpreter_results, "check_gpu_tiles")


def test_triton_interpreter_scan_segments(interpreter_results):
    """The forward scan split into segments side by side, plus the carry pass, equals one scan."""
    in_subprocess(interpreter_results, "check_scan_segments")


def test_triton_interpreter_dispatch(interpreter_results):
    """retention_op sends resets and the parallel mode to the kernels, and matches the torch path."""
    in_subprocess(interpreter_results, "check_dispatch")


def test_triton_interpreter_compiled_in_graph(interpreter_results):
    """torch.compile traces the kernels' custom ops without a graph break, and matches eager."""
    in_subprocess(interpreter_results, "check_compiled_in_graph")


def test_triton_interpreter_budget_recomputes_retention(interpreter_results):
    """A low activation memory budget lets the compiled block recompute retention instead of keeping it."""
    in_subprocess(interpreter_results, "check_budget_recomputes_retention")


def test_triton_interpreter_normalized_retention(interpreter_results):
    """The paper's normalization on the kernels' output and row sums equals its formula."""
    in_subprocess(interpreter_results, "check_normalized_retention")


def test_triton_interpreter_gradient_through_a_returned_state(interpreter_results):
    """A forward continuing a returned state backpropagates into the forward that returned it, as on torch."""
    in_subprocess(interpreter_results, "check_gradient_through_a_returned_state")
