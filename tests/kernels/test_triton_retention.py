"""Triton backend vs the torch reference.

On CPU the kernels run under Triton's interpreter. TRITON_INTERPRET=1 must be set before triton
itself is first imported (triton.language's helpers are jit'd at import), which another test or
torch.compile may already have done in this process, so the CPU cases run in one fresh
subprocess (this file run as a script with `all`; importing torch + triton there takes seconds).
Small shapes against the fp64 torch path: fp32 within 1e-4 of each output's max magnitude (fp32
rounding only), bf16 within 2e-2 (8 bits of mantissa; the torch path in bf16 lands at ~5e-3).
On GPU (pytest -m gpu): bf16 at the presets' head dims against the fp32 torch path, 2e-2; fp32
against fp64, 1e-4.
"""

import json
import os
import subprocess
import sys

if __name__ == "__main__":  # a CPU case in its own process: the interpreter, before triton loads
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

from retnet_train.model.retnet import decay_log_gammas

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FP32_TOL = 1e-4
BF16_TOL = 2e-2
NAMES = ["o", "row sums", "final state", "dq", "dk", "dv"]


def rel_err(a, ref):
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=1e-12)).item()


def interpreted():
    from retnet_train.kernels import triton_retention as mod
    from retnet_train.kernels import triton_retention_launch as kernels

    assert mod.INTERPRET
    assert mod.launch is kernels.launch  # FIXED_META set here is what the launches read
    return mod, kernels


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
]


@pytest.fixture(scope="module")
def interpreter_results():
    """Every CPU case in one fresh interpreter process (importing torch + triton takes seconds):
    {case: None if it passed, else its traceback}."""
    pytest.importorskip("triton")
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


def in_subprocess(results, case, *args):
    err = results[" ".join(map(str, (case, *args)))]
    assert err is None, err


def inputs(B, T, H, K, V, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, T, H, K, device=device, generator=g)
    k = torch.randn(B, T, H, K, device=device, generator=g) * K**-0.5
    v = torch.randn(B, T, H, V, device=device, generator=g)
    return q, k, v


def resets(B, T, C, device="cpu", seed=0):
    """Document starts: at 0 in batch row 0, on a chunk boundary, inside chunks, and two adjacent."""
    g = torch.Generator(device=device).manual_seed(seed)
    reset = torch.rand(B, T, device=device, generator=g) < 4 / T
    reset[0, 0] = True
    reset[-1, min(C, T - 1)] = True
    reset[0, T // 2 : T // 2 + 2] = True
    return reset


def run(fn, q, k, v, dtype, state=None):
    leaves = [t.to(dtype).clone().requires_grad_() for t in (q, k, v)]
    o, s, final = fn(*leaves, state)
    w = torch.linspace(-1, 1, o.shape[-1], device=o.device, dtype=torch.float64)
    (o.double() * w).sum().backward()
    return [o, s, final, *(t.grad for t in leaves)]


def torch_path(C, lg, reset=None, row_sums=True):
    from retnet_train.kernels import retention_op

    return lambda q, k, v, state: retention_op(
        "torch", q, k, v, lg.to(q.device), "chunkwise", C, reset, state, row_sums
    )


def triton_path(C, lg, reset=None, row_sums=True):
    """The kernels themselves, not the dispatcher (which refuses key dims the GPU test has not passed)."""
    from retnet_train.kernels.triton_retention import triton_retention

    return lambda q, k, v, state: triton_retention(q, k, v, lg.to(q.device), C, state, row_sums, reset)


def assert_close(got, ref, tol, names=NAMES):
    """Every output within tol of its reference's max magnitude; a failure lists all the errors."""
    errs = {}
    for name, a, b in zip(names, got, ref):
        if b is None:
            assert a is None, name
            continue
        assert a.shape == b.shape, (name, a.shape, b.shape)
        errs[name] = rel_err(a, b)
    bad = [name for name, err in errs.items() if not err < tol]
    assert not bad, f"{bad}: relative error >= {tol}; all: " + ", ".join(f"{n} {e:.2e}" for n, e in errs.items())


def reference_states(q, k, v, do, lg, C, reset, s0, z0):
    """The kernels' chunk-entry states by their recurrences (triton_retention_states), in fp64:
    S [B*H, N, K, V], z [B*H, N, K], the final S [B*H, K, V] and z [B*H, K], and dG [B*H, N, K, V]."""
    from retnet_train.kernels.triton_retention import doc_starts

    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v, do = (t.double().transpose(1, 2) for t in (q, k, v, do))  # [B, H, T, D]
    g = lg.double().exp().view(1, H, 1)
    doc = doc_starts(reset)
    S, z = s0.double().view(B, H, K, V), z0.double().view(B, H, K)
    states, sums, carries, gains = [], [], [], []
    for c0 in range(0, T, C):
        end = min(c0 + C, T)
        t = torch.arange(c0, end, device=q.device)
        carry = g[..., 0] ** (end - c0) * (doc[:, end - 1] < c0).view(B, 1)  # [B, H]; 0 after a document start
        key_w = g ** (end - 1 - t) * (t >= doc[:, end - 1 : end]).view(B, 1, -1)  # keys of the last document
        query_w = g ** (t - c0 + 1) * (doc[:, c0:end] < c0).view(B, 1, -1)  # queries before a document start
        states.append(S)
        sums.append(z)
        kw = k[:, :, c0:end] * key_w[..., None]
        S = carry[..., None, None] * S + kw.transpose(-1, -2) @ v[:, :, c0:end]
        z = carry[..., None] * z + kw.sum(2)
        carries.append(carry[..., None, None])
        gains.append((q[:, :, c0:end] * query_w[..., None]).transpose(-1, -2) @ do[:, :, c0:end])
    dG = [torch.zeros_like(S)]
    for n in range(len(gains) - 1, 0, -1):
        dG.insert(0, carries[n] * dG[0] + gains[n])
    flat = lambda xs: torch.stack(xs, 2).flatten(0, 1)  # noqa: E731
    return flat(states), flat(sums), S.flatten(0, 1), z.flatten(0, 1), flat(dG)


def check_kernels_separately(B, T, H, K, V, C, dtype, tol, kernels=("states", "apply"), device="cpu"):
    """Each kernel on its own, with an incoming state, a partial chunk and a document start inside the
    second chunk (the first chunk carries the state on, the second sends dG back to the first): the
    forward state scan (S, z, final state) and the backward's S and dG scans (one launch) against the
    recurrences; the four output passes, fed the exact states, against the torch path (o and row
    sums, dq, dk, dv)."""
    from retnet_train.kernels import triton_retention as mod

    lg = decay_log_gammas(H).to(device)
    q, k, v = inputs(B, T, H, K, V, device=device, seed=8)
    reset = torch.zeros(B, T, dtype=torch.bool, device=device)
    reset[:, C + C // 4] = True
    st = torch.randn(B, H, K, V + 1, device=device, generator=torch.Generator(device=device).manual_seed(6)) * 0.1
    do = torch.linspace(-1, 1, V, device=device, dtype=torch.float64).expand(B, T, H, V)  # run()'s output weights
    s0, z0 = st[..., :V].reshape(B * H, K, V), st[..., V].reshape(B * H, K).contiguous()
    S, z, fin, zfin, dG = reference_states(q, k, v, do, lg, C, reset, s0, z0)
    lg2 = (lg.float() * mod.LOG2E).contiguous()
    doc = mod.doc_starts(reset)
    q_, k_, v_, do_, s0_, S_, dG_ = (t.to(dtype).contiguous() for t in (q, k, v, do, s0, S, dG))
    got, ref = {}, {}
    if "states" in kernels:
        got.update(zip(["S", "z", "final S", "final z"], mod._states(k_, v_, lg2, C, False, doc, s0_, z0, True)))
        got.update(zip(["pair S", "pair dG"], mod._states_pair(q_, k_, v_, do_, lg2, C, doc, s0_)))
        ref.update({"S": S, "z": z, "final S": fin, "final z": zfin, "pair S": S, "pair dG": dG})
    if "apply" in kernels:
        o, s, _, dq, dk, dv = run(torch_path(C, lg, reset), q, k, v, torch.float64, st.double())
        got["o"], got["row sums"] = mod._apply(q_, k_, v_, S_, lg2, C, False, False, doc, Z=z.float().contiguous())
        got["dq"] = mod._apply(do_, v_, k_, S_, lg2, C, False, True, doc)[0]
        got["dk"] = mod._apply(v_, do_, q_, dG_, lg2, C, True, True, doc)[0]
        got["dv"] = mod._apply(k_, q_, do_, dG_, lg2, C, True, False, doc)[0]
        ref.update({"o": o, "row sums": s, "dq": dq, "dk": dk, "dv": dv})
    assert_close(list(got.values()), [ref[name] for name in got], tol, names=list(got))


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


def test_triton_interpreter_dispatch(interpreter_results):
    """retention_op sends resets and the parallel mode to the kernels, and matches the torch path."""
    in_subprocess(interpreter_results, "check_dispatch")


@pytest.mark.parametrize("backend", ["triton", "fla"])
def test_gpu_backends_refuse_cpu(backend):
    from retnet_train.kernels import resolve_backend

    with pytest.raises(ValueError, match=f"model.retention_backend={backend} needs a CUDA or ROCm device"):
        resolve_backend(backend, torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


def test_doc_starts():
    from retnet_train.kernels.triton_retention import doc_starts

    reset = torch.tensor([[False, False, True, False, True], [True, False, False, False, False]])
    assert doc_starts(reset).tolist() == [[-1, -1, 2, 2, 4], [0, 0, 0, 0, 0]]


# ---- the interpreter cases ----------------------------------------------------------------------
def check_matches_torch(B, T, H, K, V, C):
    interpreted()
    lg = decay_log_gammas(H)
    q, k, v = inputs(B, T, H, K, V)
    assert_close(
        run(triton_path(C, lg), q, k, v, torch.float32), run(torch_path(C, lg), q, k, v, torch.float64), FP32_TOL
    )


def _with_blocks(kernels, fn, **meta):
    kernels.FIXED_META.update(meta)
    try:
        fn()
    finally:
        kernels.FIXED_META.clear()


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

    _with_blocks(kernels, case, apply={"BR": 16, "BC": 16, "BD": 32, "BE": 16}, states={"BX": 16, "BY": 32, "BT": 16})


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

    _with_blocks(kernels, case, apply={"BR": 64, "BC": 32, "BD": 32, "BE": 32})


def check_bf16():
    interpreted()
    B, T, H, K, V, C = 1, 128, 2, 32, 64, 64
    lg = decay_log_gammas(H)
    q, k, v = inputs(B, T, H, K, V, seed=6)
    reset = resets(B, T, C, seed=3)
    st = torch.randn(B, H, K, V + 1, generator=torch.Generator().manual_seed(4)) * 0.1
    ref = run(torch_path(C, lg, reset), q, k, v, torch.float64, st.double())
    got = run(triton_path(C, lg, reset), q, k, v, torch.bfloat16, st.bfloat16())
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32 and got[2].dtype == torch.bfloat16
    assert_close(got, ref, BF16_TOL)


def check_gpu_tiles():
    """The block shapes the GPU autotuner picks at K256/V512 (bf16), on heads half as wide so that it
    stays fast, every head dim still over several tiles: states 64 x 128 (2 x 2 tiles, 2 token blocks
    per chunk), 64-row blocks with the chunk's other column blocks (phase 3), 128-wide output tiles
    and 64-deep contraction slices."""
    _, kernels = interpreted()
    case = lambda: check_kernels_separately(1, 200, 1, 128, 256, 128, torch.bfloat16, BF16_TOL)  # noqa: E731
    _with_blocks(kernels, case, states=dict(BX=64, BY=128, BT=64), apply=dict(BR=64, BC=64, BD=128, BE=64))


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


# ---- GPU ------------------------------------------------------------------------------------------
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA/ROCm")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(
    "T,C,K,V,docs", [(2048, 256, 256, 512, False), (2000, 128, 256, 512, True), (1024, 64, 128, 256, True)]
)
def test_triton_bf16_matches_torch_fp32_gpu(T, C, K, V, docs):
    B, H = 2, 4
    lg = decay_log_gammas(H).cuda()
    q, k, v = inputs(B, T, H, K, V, device="cuda")
    reset = resets(B, T, C, device="cuda") if docs else None
    st = torch.randn(B, H, K, V + 1, device="cuda") * 0.1
    ref = run(torch_path(C, lg, reset), q, k, v, torch.float32, st)
    got = run(triton_path(C, lg, reset), q, k, v, torch.bfloat16, st.bfloat16())
    assert_close(got, ref, BF16_TOL)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("kernel", ["states", "apply"])
def test_triton_every_config_gpu(kernel):
    """Every autotuning candidate of a kernel (the autotuner picks by time, so any may run) at the
    widest heads, bf16, each kernel on its own: a failure names the config and the outputs it got wrong."""
    from retnet_train.kernels import triton_retention_launch as kernels

    failures = []
    for cfg in kernels.KERNELS[kernel][2]:
        case = lambda: check_kernels_separately(1, 512, 2, 256, 512, 256, torch.bfloat16, BF16_TOL, (kernel,), "cuda")  # noqa: B023, E731
        try:
            _with_blocks(kernels, case, **{kernel: cfg.kwargs})
        except AssertionError as e:
            failures.append(f"{cfg}: {e}")
    assert not failures, "\n".join(failures)


@pytest.mark.gpu
@needs_gpu
def test_triton_fp32_matches_torch_fp64_gpu():
    B, T, H, K, V, C = 1, 640, 2, 128, 256, 128
    lg = decay_log_gammas(H).cuda()
    q, k, v = inputs(B, T, H, K, V, device="cuda")
    reset = resets(B, T, C, device="cuda")
    ref = run(torch_path(C, lg, reset), q, k, v, torch.float64)
    assert_close(run(triton_path(C, lg, reset), q, k, v, torch.float32), ref, FP32_TOL)


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
