"""Triton backend vs the torch reference.

On CPU the kernels run under Triton's interpreter. TRITON_INTERPRET=1 must be set before triton
itself is first imported (triton.language's helpers are jit'd at import), which another test or
torch.compile may already have done in this process, so the CPU cases run in one fresh
subprocess (this file run as a script with `all`; importing torch + triton there takes seconds). Small shapes, fp32 inputs against the fp64 torch path: tolerance
1e-4 of each output's max magnitude (fp32 rounding only). On GPU (pytest -m gpu): bf16 at the
paper's head dims against the fp32 torch path, 2e-2 (bf16 has 8 bits of mantissa).
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

CPU_TOL = 1e-4
GPU_TOL = 2e-2


def rel_err(a, ref):
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=1e-12)).item()


def interpreted_module():
    from retnet_train.kernels import triton_retention as mod

    assert mod.INTERPRET
    return mod


CPU_CASES = [("check_matches_torch", 2, 80, 2, 32, 64, 32), ("check_matches_torch", 1, 128, 2, 64, 128, 64),
             ("check_state_and_no_row_sums",), ("check_block_mix",)]


@pytest.fixture(scope="module")
def interpreter_results():
    """Every CPU case in one fresh interpreter process (importing torch + triton takes seconds):
    {case: None if it passed, else its traceback}."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "all"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def in_subprocess(results, case, *args):
    err = results[" ".join(map(str, (case, *args)))]
    assert err is None, err


def inputs(B, T, H, K, V, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, T, H, K, device=device, generator=g)
    k = torch.randn(B, T, H, K, device=device, generator=g) * K ** -0.5
    v = torch.randn(B, T, H, V, device=device, generator=g)
    return q, k, v


def run(fn, q, k, v, dtype, state=None):
    leaves = [t.to(dtype).clone().requires_grad_() for t in (q, k, v)]
    o, s, final = fn(*leaves, state)
    w = torch.linspace(-1, 1, o.shape[-1], device=o.device, dtype=torch.float64)
    (o.double() * w).sum().backward()
    return o, s, final, [t.grad for t in leaves]


def torch_ref(C, lg):
    from retnet_train.kernels import retention_op
    return lambda q, k, v, state: retention_op("torch", q, k, v, lg.to(q.device), "chunkwise", C, None, state, True)


@pytest.mark.parametrize("B,T,H,K,V,C", [(2, 80, 2, 32, 64, 32), (1, 128, 2, 64, 128, 64)])
def test_triton_interpreter_matches_torch(interpreter_results, B, T, H, K, V, C):
    in_subprocess(interpreter_results, "check_matches_torch", B, T, H, K, V, C)


def test_triton_interpreter_state_and_no_row_sums(interpreter_results):
    in_subprocess(interpreter_results, "check_state_and_no_row_sums")


def test_triton_interpreter_block_mix(interpreter_results):
    """The GPU tuner's shapes: 128-row output blocks and 128 x 128 summaries consuming scores
    written in 32-row blocks, over a partial last chunk and an incoming state."""
    in_subprocess(interpreter_results, "check_block_mix")


@pytest.mark.parametrize("backend", ["triton", "fla"])
def test_gpu_backends_refuse_cpu(backend):
    from retnet_train.kernels import resolve_backend

    with pytest.raises(ValueError, match=f"model.retention_backend={backend} needs a CUDA or ROCm device"):
        resolve_backend(backend, torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


def check_matches_torch(B, T, H, K, V, C):
    mod = interpreted_module()
    lg = decay_log_gammas(H)
    q, k, v = inputs(B, T, H, K, V)
    ref = run(torch_ref(C, lg), q, k, v, torch.float64)
    got = run(lambda q, k, v, st: mod.triton_retention(q, k, v, lg, C, st, True), q, k, v, torch.float32)
    names = ["o", "row sums", "final state"]
    for name, a, b in zip(names, got[:3], ref[:3]):
        assert a.shape == b.shape, name
        assert rel_err(a, b) < CPU_TOL, name
    for name, a, b in zip(["dq", "dk", "dv"], got[3], ref[3]):
        assert rel_err(a, b) < CPU_TOL, name


def check_state_and_no_row_sums():
    """An incoming state (chunked prefill continues), and the plain [B, H, K, V] state without row sums."""
    mod = interpreted_module()
    B, T, H, K, V, C = 1, 48, 2, 32, 64, 16
    lg = decay_log_gammas(H)
    q, k, v = inputs(B, T, H, K, V, seed=1)
    ref = torch_ref(C, lg)
    with torch.no_grad():
        o_ref, s_ref, st_ref = ref(*(t.double() for t in (q, k, v)), None)
        o1, s1, st = mod.triton_retention(q[:, :20], k[:, :20], v[:, :20], lg, C, None, True)
        o2, s2, st = mod.triton_retention(q[:, 20:], k[:, 20:], v[:, 20:], lg, C, st, True)
        o3, s3, st3 = mod.triton_retention(q, k, v, lg, C, None, False)
    assert rel_err(torch.cat([o1, o2], 1), o_ref) < CPU_TOL
    assert rel_err(torch.cat([s1, s2], 1), s_ref) < CPU_TOL
    assert rel_err(st, st_ref) < CPU_TOL
    assert s3 is None and st3.shape == (B, H, K, V)
    assert rel_err(o3, o_ref) < CPU_TOL and rel_err(st3, st_ref[..., :V]) < CPU_TOL


def check_block_mix():
    mod = interpreted_module()
    mod.INTERP_META.update(scores={"BT": 32, "BE": 64}, out={"BT": 128, "BD": 64, "BE": 64, "BS": 64},
                           summary={"BX": 32, "BY": 64, "BT": 64})
    try:
        _block_mix(mod)
    finally:
        mod.INTERP_META.clear()


def _block_mix(mod):
    B, T, H, K, V, C = 1, 160, 1, 32, 64, 128
    lg = decay_log_gammas(H)
    q, k, v = inputs(B, T, H, K, V, seed=2)
    g = torch.Generator().manual_seed(3)
    st = torch.randn(B, H, K, V + 1, generator=g) * 0.1
    ref = run(torch_ref(C, lg), q, k, v, torch.float64, st.double())
    got = run(lambda q, k, v, s: mod.triton_retention(q, k, v, lg, C, s, True), q, k, v, torch.float32, st)
    for name, a, b in zip(["o", "row sums", "final state", "dq", "dk", "dv"], [*got[:3], *got[3]], [*ref[:3], *ref[3]]):
        assert rel_err(a, b) < CPU_TOL, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA/ROCm")
@pytest.mark.parametrize("T,C", [(2048, 256), (2000, 128)])
def test_triton_matches_torch_bf16_paper_dims(T, C):
    from retnet_train.kernels import retention_op
    B, H, K, V = 1, 4, 256, 512
    lg = decay_log_gammas(H).cuda()
    q, k, v = inputs(B, T, H, K, V, device="cuda")
    ref = run(torch_ref(C, lg), q, k, v, torch.float32)
    got = run(lambda q, k, v, st: retention_op("triton", q, k, v, lg, "chunkwise", C, None, st, True), q, k, v, torch.bfloat16)
    for name, a, b in zip(["o", "row sums", "final state", "dq", "dk", "dv"], [*got[:3], *got[3]], [*ref[:3], *ref[3]]):
        assert rel_err(a, b) < GPU_TOL, name


def _patch_interpreter_index():
    """Triton 3.6's interpreter keeps scalars as 1-element arrays and turns them into Python ints
    with int(array), which numpy >= 2.4 refuses for 1-d arrays; the kernels' loops whose bounds
    depend on the program id (the causal block skipping) need that conversion."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


if __name__ == "__main__":
    torch.manual_seed(0)
    _patch_interpreter_index()
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
