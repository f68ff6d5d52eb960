"""The Triton kernels under Triton's CPU interpreter, in a fresh process.

TRITON_INTERPRET=1 must be set before triton itself is first imported (triton.language's helpers
are jit'd at import), which another test or torch.compile may already have done in the pytest
process, so the cases here run in one subprocess: run_cases() starts this file as a script with
`all` (importing torch + triton there takes seconds) and returns {case: None if it passed, else its
traceback}. Small shapes against the fp64 torch path (tolerances: triton_helpers)."""

import json
import os
import subprocess
import sys

if __name__ == "__main__":  # a CPU case in its own process: the interpreter, before triton loads
    os.environ["TRITON_INTERPRET"] = "1"

import torch
from triton_helpers import (
    BF16_TOL,
    FP32_TOL,
    NAMES,
    assert_close,
    check_kernels_separately,
    inputs,
    reference_states,
    resets,
    run,
    torch_path,
    triton_path,
    with_blocks,
)

from retnet_train.model.retnet import decay_log_gammas

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (case, args...): each runs in the interpreter subprocess; see the check_* functions below.
CPU_CASES = [
    ("check_matches_torch", 2, 80, 2, 32, 64, 32),
    ("check_matches_torch", 1, 128, 2, 64, 128, 64),
    ("check_blocks_resets_state",),
    ("check_resets_only_and_no_row_sums",),
    ("check_prefill_continues",),
    ("check_small_decay",),
    ("check_bf16",),
    ("check_dispatch",),
    ("check_gpu_tiles",),
    ("check_scan_segments",),
    ("check_compiled_in_graph",),
    ("check_budget_recomputes_retention",),
    ("check_normalized_retention",),
    ("check_gradient_through_a_returned_state",),
]


def run_cases() -> dict:
    """Every CPU case in one fresh interpreter process."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "all"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def interpreted():
    from retnet_train.kernels import triton_retention as mod
    from retnet_train.kernels import triton_retention_launch as kernels

    assert mod.INTERPRET
    assert mod.launch is kernels.launch  # FIXED_META set here is what the launches read
    return mod, kernels


# ---- the interpreter cases ----------------------------------------------------------------------
def check_matches_torch(B, T, H, K, V, C):
    interpreted()
    lg = decay_log_gammas(H)
    q, k, v = inputs(B, T, H, K, V)
    assert_close(
        run(triton_path(C, lg), q, k, v, torch.float32), run(torch_path(C, lg), q, k, v, torch.float64), FP32_TOL
    )


def check_blocks_resets_state():
    """Chunk 48 in row and column blocks of 16 (3 per chunk), value tiles of 32, key slices of 16, T = 80
    (a partial chunk), document starts and an incoming state with its row-sum column."""
    _, kernels = interpreted()
    B, T, H, K, V, C = 2, 80, 2, 32, 64, 48
    lg = decay_log_gammas(H)
    q, k, v = inputs(B, T, H, K, V, seed=2)
    reset = resets(B, T, C)
    st = torch.randn(B, H, K, V + 1, generator=torch.Generator().manual_seed(3)) * 0.1

    def case():
        ref = run(torch_path(C, lg, reset), q, k, v, torch.float64, st.double())
        assert_close(run(triton_path(C, lg, reset), q, k, v, torch.float32, st), ref, FP32_TOL)

    blocks = dict(scores={"BR": 16, "BC": 16, "BE": 16}, apply={"BR": 16, "BC": 16, "BD": 32, "BE": 16})
    with_blocks(kernels, case, **blocks, states={"BX": 16, "BY": 32, "BT": 16})


def check_resets_only_and_no_row_sums():
    interpreted()
    B, T, H, K, V, C = 2, 96, 2, 32, 32, 32
    lg = decay_log_gammas(H)
    q, k, v = inputs(B, T, H, K, V, seed=4)
    reset = resets(B, T, C, seed=1)
    ref = run(torch_path(C, lg, reset, row_sums=False), q, k, v, torch.float64)
    got = run(triton_path(C, lg, reset, row_sums=False), q, k, v, torch.float32)
    assert got[1] is None and got[2].shape == (B, H, K, V)
    assert_close(got, ref, FP32_TOL)


def check_prefill_continues():
    """Two calls with the state handed over equal one call (chunked prefill), also without row sums."""
    mod, _ = interpreted()
    B, T, H, K, V, C = 1, 48, 2, 32, 64, 16
    lg = decay_log_gammas(H)
    q, k, v = inputs(B, T, H, K, V, seed=1)
    with torch.no_grad():
        o_ref, s_ref, st_ref = torch_path(C, lg)(*(t.double() for t in (q, k, v)), None)
        o1, s1, st = mod.triton_retention(q[:, :20], k[:, :20], v[:, :20], lg, C, None, True)
        o2, s2, st = mod.triton_retention(q[:, 20:], k[:, 20:], v[:, 20:], lg, C, st, True)
        o3, s3, st3 = mod.triton_retention(q, k, v, lg, C, None, False)
    assert_close([torch.cat([o1, o2], 1), torch.cat([s1, s2], 1), st], [o_ref, s_ref, st_ref], FP32_TOL)
    assert s3 is None and st3.shape == (B, H, K, V)
    assert_close([o3, st3], [o_ref, st_ref[..., :V]], FP32_TOL)


def check_small_decay():
    _, kernels = interpreted()
    B, T, H, K, V, C = 1, 160, 2, 32, 32, 128
    lg = torch.tensor([-4.6, -0.01])  # gamma 0.01: gamma^-32 overflows fp32
    q, k, v = inputs(B, T, H, K, V, seed=5)
    reset = resets(B, T, C, seed=2)

    def case():
        ref = run(torch_path(C, lg, reset), q, k, v, torch.float64)
        assert_close(run(triton_path(C, lg, reset), q, k, v, torch.float32), ref, FP32_TOL)

    with_blocks(kernels, case, scores={"BR": 64, "BC": 32, "BE": 32}, apply={"BR": 64, "BC": 32, "BD": 32, "BE": 32})


def check_bf16():
    interpreted()
    B, T, H, K, V, C = 1, 128, 2, 32, 64, 64
    lg = decay_log_gammas(H)
    q, k, v = inputs(B, T, H, K, V, seed=6)
    reset = resets(B, T, C, seed=3)
    st = torch.randn(B, H, K, V + 1, generator=torch.Generator().manual_seed(4)) * 0.1
    ref = run(torch_path(C, lg, reset), q, k, v, torch.float64, st.double())
    got = run(triton_path(C, lg, reset), q, k, v, torch.bfloat16, st.bfloat16())
    # the final state in fp32 as the scan kept it (the recurrent form's and fla's format), not rounded to bf16
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    assert_close(got, ref, BF16_TOL)


def check_gpu_tiles():
    """The block shapes the GPU autotuner picks at K256/V512 (bf16), on heads half as wide so that it
    stays fast, every head dim still over several tiles: states 64 x 128 (2 x 2 tiles, 2 token blocks
    per chunk), scores in 64-row blocks (the chunk's earlier column blocks and the zeros after the
    diagonal), output passes in 128-row blocks reading them, 128-wide output tiles and 64-deep
    contraction slices."""
    _, kernels = interpreted()
    case = lambda: check_kernels_separately(1, 200, 1, 128, 256, 128, torch.bfloat16, BF16_TOL)  # noqa: E731
    blocks = dict(scores=dict(BR=64, BC=64, BE=64), apply=dict(BR=128, BC=64, BD=128, BE=64))
    with_blocks(kernels, case, states=dict(BX=64, BY=128, BT=64), **blocks)


def check_scan_segments():
    """The forward scan in 2, 3, 4 and 7 segments (7 chunks, the last partial) equals the recurrence
    and the torch path: with document starts inside a segment and on a segment's first token, an
    incoming state and row sums; and without resets (the carries then never vanish)."""
    mod, kernels = interpreted()
    B, T, H, K, V, C = 2, 100, 2, 32, 32, 16
    lg = decay_log_gammas(H)
    q, k, v = inputs(B, T, H, K, V, seed=3)
    st = torch.randn(B, H, K, V + 1, generator=torch.Generator().manual_seed(5)) * 0.1
    s0, z0 = st[..., :V].reshape(B * H, K, V).contiguous(), st[..., V].reshape(B * H, K).contiguous()
    reset = resets(B, T, C, seed=5)
    reset[0, 3 * C] = reset[1, 2 * C + 5] = True
    lg2 = (lg.float() * mod.LOG2E).contiguous()
    saved = kernels.SCAN_SEGMENTS
    try:
        for segments in (2, 3, 4, 7):
            kernels.SCAN_SEGMENTS = segments
            for docs in (reset, None):
                ref = run(torch_path(C, lg, docs), q, k, v, torch.float64, st.double())
                assert_close(run(triton_path(C, lg, docs), q, k, v, torch.float32, st), ref, FP32_TOL)
            S, z, fin, zfin, _ = reference_states(q, k, v, torch.zeros_like(v), lg, C, reset, s0, z0)
            got = mod._states(k, v, lg2, C, mod.doc_starts(reset), s0, z0, True)
            assert_close(list(got), [S, z, fin, zfin], FP32_TOL, names=["S", "z", "final S", "final z"])
    finally:
        kernels.SCAN_SEGMENTS = saved


def check_dispatch():
    """Resets and the parallel mode go to the kernels (a stand-in kernel records the call)."""
    mod, _ = interpreted()
    from retnet_train.kernels import retention_op

    B, T, H, K, V = 1, 40, 2, 16, 32
    lg = decay_log_gammas(H)
    q, k, v = inputs(B, T, H, K, V, seed=7)
    reset = resets(B, T, 16, seed=4)
    seen = []
    real = mod.triton_retention
    mod.triton_retention = lambda *a: (seen.append(a[4]), real(*a))[1]
    try:
        got = retention_op("triton", q, k, v, lg, "parallel", 16, reset, None, True)
    finally:
        mod.triton_retention = real
    ref = retention_op("torch", q.double(), k.double(), v.double(), lg, "parallel", 16, reset, None, True)
    assert seen == [64]  # parallel: one chunk of the sequence rounded up to 64
    assert_close(got, ref, FP32_TOL, names=NAMES[:3])


def check_compiled_in_graph():
    """The kernels are torch custom ops: a compiled function traces them without a graph break
    (fullgraph) and matches eager; the flop counter sees the flops the partitioner weighs."""
    mod, _ = interpreted()
    from torch.utils.flop_counter import FlopCounterMode

    B, T, H, K, V, C = 1, 96, 2, 32, 64, 32
    lg = decay_log_gammas(H)
    q, k, v = inputs(B, T, H, K, V, seed=8)
    reset = resets(B, T, C, seed=5)
    eager = run(triton_path(C, lg, reset), q, k, v, torch.float32)
    compiled = torch.compile(lambda q, k, v, st: mod.triton_retention(q, k, v, lg, C, st, True, reset), fullgraph=True)
    assert_close(run(compiled, q, k, v, torch.float32), eager, 1e-6)
    with FlopCounterMode(display=False) as counter:
        run(triton_path(C, lg, reset), q, k, v, torch.float32)
    forward = 2 * B * T * H * (C * (K + V) // 2 + 2 * K * V)
    assert counter.get_total_flops() == 3 * forward  # the backward counts twice the forward


def check_budget_recomputes_retention():
    """Under a low activation memory budget the compiled block may recompute retention in the backward:
    a block keeps 7 d-wide tensors per token at budget 0.4 (with retention behind a graph break it had
    to keep q, k, v and the output: 11)."""
    from retnet_train.bench.activation_bytes import layer_bytes_per_token
    from retnet_train.bench.presets import load_preset
    from retnet_train.model import retnet

    interpreted()
    retnet.resolve_backend = lambda backend, device, key_dim=0: "triton"  # (its CPU refusal is tested elsewhere)
    cfg = load_preset("125m", d_model=128, n_heads=2, ffn_dim=256, vocab_size=256, chunk_size=64)
    kept = layer_bytes_per_token(cfg, 1, 128, torch.device("cpu"), compile=True, activation_memory_budget=0.4)
    d_wide = kept["bytes_per_token"] / (2 * cfg.d_model)  # bf16
    assert d_wide < 7.5, kept


def check_normalized_retention():
    """The model's normalized retention (before the per-head norm) on the kernels equals the paper's
    formula (test_retention_normalization.py): parallel, chunkwise over 3 chunks, and continuing a
    prefill's state; fp32."""
    mod, _ = interpreted()
    from test_retention_normalization import check_forms_against_formula

    from retnet_train.model import retnet

    calls, real, resolve = [], mod.triton_retention, retnet.resolve_backend
    mod.triton_retention = lambda *a: (calls.append(a[4]), real(*a))[1]
    retnet.resolve_backend = lambda backend, device, key_dim=0: backend  # (its CPU refusal: test_dispatch)
    try:
        runs = [("parallel", 16, 0), ("chunkwise", 16, 0), ("chunkwise", 16, 20)]
        check_forms_against_formula("triton", torch.float32, runs, 1e-5, T=40)
    finally:
        mod.triton_retention, retnet.resolve_backend = real, resolve
    assert calls == [64, 64, 16, 16, 16], calls  # each forward on the kernels (parallel: one chunk of 64)


def check_gradient_through_a_returned_state():
    """A model on the kernels whose returned state feeds a second forward (truncated backpropagation
    through time) gets the torch backend's gradients: the kernels' final state carries none, so such a
    forward runs on the torch path."""
    interpreted()
    from retnet_train.model import RetNetConfig, RetNetForCausalLM, retnet

    retnet.resolve_backend = lambda backend, device, key_dim=0: backend  # (its CPU refusal: test_dispatch)
    cfg = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=2, ffn_dim=32, chunk_size=16)
    models = [RetNetForCausalLM(RetNetConfig(**cfg, retention_backend=b)) for b in ("triton", "torch")]
    models[1].load_state_dict(models[0].state_dict())
    ids = torch.randint(0, 50, (2, 64))
    grads = []
    for model in models:
        state = model(ids[:, :32], return_state=True).state
        model(ids[:, 32:], labels=ids[:, 32:], state=state).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    assert_close(grads[0], grads[1], FP32_TOL, names=[n for n, _ in models[0].named_parameters()])


# ---- the interpreter subprocess -------------------------------------------------------------------
def _patch_interpreter():
    """Two gaps of Triton's CPU interpreter: (1) it keeps scalars as 1-element arrays and turns them
    into Python ints with int(array), which numpy >= 2.4 refuses for 1-d arrays (loops whose bounds
    depend on the program id need that); (2) its dot multiplies bf16 operands as their raw 16-bit
    integers and its fp32 -> bf16 cast truncates; here bf16 operands are widened exactly and the
    cast rounds to nearest even, as the GPU does."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched

    def widen(h):
        if h.dtype.scalar == tl.bfloat16:
            return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return h

    dot = interpreter.InterpreterBuilder.create_dot
    interpreter.InterpreterBuilder.create_dot = lambda self, a, b, *rest: dot(self, widen(a), widen(b), *rest)
    cast = interpreter.InterpreterBuilder.cast_impl

    def cast_rne(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            return interpreter.TensorHandle(bits, tl.bfloat16)
        return cast(self, src, dst_type)

    interpreter.InterpreterBuilder.cast_impl = cast_rne


if __name__ == "__main__":
    torch.manual_seed(0)
    _patch_interpreter()
    if sys.argv[1] != "all":
        globals()[sys.argv[1]](*map(int, sys.argv[2:]))
    else:
        import traceback

        results = {}
        for case, *args in CPU_CASES:
            try:
                globals()[case](*args)
                results[" ".join(map(str, (case, *args)))] = None
            except Exception:
                results[" ".join(map(str, (case, *args)))] = traceback.format_exc()[-3000:]
        print(json.dumps(results))
