"""Compile the Triton kernels for GPU targets on a CPU machine (no GPU, no interpreter).

The interpreter (triton_interpreter.py) runs the kernels' Python semantics and skips what only the
compiler checks: a name bound to values of two types in the two branches of an `if`, a dtype that
MMAs refuse, a shape that does not broadcast. Here the launches of the retention op are captured
instead of run (JITFunction.run records the arguments and the config), each distinct launch is
compiled with triton.compile for a GPU architecture, its shared memory held to that GPU's limit.
Run as a script in a fresh process (the patch and RETNET_TRITON_AUTOTUNE=0, each kernel at its
first valid config, stay out of the pytest process):
    python tests/kernels/triton_compile.py cuda:90 hip:gfx942
prints one JSON line {target: {launch: null or the error}}. With --digest first, {target: {launch: a
digest of the generated code}} instead (PTX or AMDGCN without its debug info and line marks): a
refactor of the kernels' source that leaves every digest as it was leaves the GPU code unchanged,
so it needs no new timing run. With --both first, {"compiled": the first, "digest": the second}
from one compilation of each launch.
"""

import hashlib
import json
import os
import re
import sys

os.environ["RETNET_TRITON_AUTOTUNE"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32", torch.int64: "i64"}
OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")
# What one program may use: H100/H200 227 KiB of shared memory per block, MI300 64 KiB of LDS.
SHARED_MEMORY = {"cuda": 227 * 1024, "hip": 64 * 1024}


def _type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def capture(fn):
    """Run fn() with every JIT launch recorded, not run: [(kernel, signature, constexprs, options)]."""
    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        bound = dict(zip(self.arg_names, args), **{k: v for k, v in kwargs.items() if k not in OPTIONS})
        constexprs = {p.name: bound[p.name] for p in self.params if p.is_constexpr}
        signature = {p.name: "constexpr" if p.is_constexpr else _type(bound[p.name]) for p in self.params}
        options = {k: kwargs[k] for k in OPTIONS if k in kwargs}
        launches.append((self, signature, constexprs, options))

    real = JITFunction.run
    JITFunction.run = record
    try:
        fn()
    finally:
        JITFunction.run = real
    return launches


def retention_launches():
    """The kernels' distinct launches in a bf16 forward + backward at the presets' head dims (K 256 /
    V 512 with resets, K 128 / V 256 with an incoming state and none; row sums, the scan in segments)."""
    from retnet_train.kernels import triton_retention_launch as launch_mod
    from retnet_train.kernels.triton_retention import triton_retention

    def step(K, V, resets, state, segments):
        B, T, H, C = 1, 512, 2, 128
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, T, H, d, generator=gen, dtype=torch.bfloat16, requires_grad=True) for d in (K, K, V))
        lg = torch.full((H,), -0.03)
        reset = torch.zeros(B, T, dtype=torch.bool) if resets else None
        if resets:
            reset[0, 300] = True
        s0 = torch.zeros(B, H, K, V + 1) if state else None  # (+1: the row sums' column)
        launch_mod.SCAN_SEGMENTS = segments
        o = triton_retention(q, k, v, lg, C, s0, True, reset)[0]
        o.float().sum().backward()

    launches = []
    for case in ((256, 512, True, False, 2), (128, 256, False, True, 2)):
        launches += capture(lambda: step(*case))  # noqa: B023 (called before the next case)
    unique = {}
    for kernel, signature, constexprs, options in launches:
        key = f"{kernel.__name__}{sorted(constexprs.items())}{sorted(options.items())}"
        unique.setdefault(key, (kernel, signature, constexprs, options))
    return unique


def _gpu(target: str) -> GPUTarget:
    backend, arch = target.split(":")
    return GPUTarget(backend, int(arch) if arch.isdigit() else arch, 32 if backend == "cuda" else 64)


def _compile(gpu: GPUTarget, kernel, signature, constexprs, options):
    return triton.compile(ASTSource(kernel, signature, constexprs), target=gpu, options=options)


def code_digest(compiled) -> str:
    """sha1 of the generated code (PTX or AMDGCN) without what moves with the source (DWARF, .loc marks,
    the labels of inlined functions' scopes, comments)."""
    text = compiled.asm["ptx"] if "ptx" in compiled.asm else compiled.asm["amdgcn"]
    code = re.split(r"\n\s*\.section\s+\.?debug", text)[0]
    lines = [
        line for line in code.splitlines() if not re.match(r"\s*(\.loc|\.file|//|;|\$L__tmp\d+:|\.Ltmp\d+:)", line)
    ]
    return hashlib.sha1("\n".join(lines).encode()).hexdigest()


def digest_all(targets):
    launches = retention_launches()
    return {
        target: {key: code_digest(_compile(gpu, *launch)) for key, launch in launches.items()}
        for target, gpu in ((t, _gpu(t)) for t in targets)
    }


def compile_all(targets, digests=False):
    """{target: {launch: null or the error}}; with digests, {"compiled": that, "digest": {target: {launch: the
    code's digest, null where it did not compile}}} from the same compilations."""
    launches = retention_launches()
    results, codes = {}, {}
    for target in targets:
        gpu = _gpu(target)
        limit = SHARED_MEMORY[gpu.backend]
        results[target], codes[target] = {}, {}
        for key, launch in launches.items():
            codes[target][key] = None
            try:
                compiled = _compile(gpu, *launch)
                shared = compiled.metadata.shared
                too_big = shared > limit  # (a launch would fail: out of resources)
                results[target][key] = f"shared memory {shared} > {limit} bytes" if too_big else None
                codes[target][key] = code_digest(compiled) if digests else None
            except Exception as e:  # noqa: BLE001 (reported per launch)
                results[target][key] = f"{type(e).__name__}: {e}"[-2000:]
    return {"compiled": results, "digest": codes} if digests else results


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    if sys.argv[1] == "--digest":
        print(json.dumps(digest_all(sys.argv[2:])))
    elif sys.argv[1] == "--both":
        print(json.dumps(compile_all(sys.argv[2:], digests=True)))
    else:
        print(json.dumps(compile_all(sys.argv[1:])))
