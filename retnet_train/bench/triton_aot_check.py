"""Offline sm_90 compile of every triton_retention kernel x tuner config (no GPU needed): catches
compile errors and prints registers/spills (cuobjdump), shared memory, and whether the dots became
pipelined wgmma (cp.async). Usage: python -m retnet_train.bench.triton_aot_check [label filter]"""
import sys, time
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from retnet_train.kernels import triton_retention as m

tgt = GPUTarget("cuda", 90, 32)
only = sys.argv[1] if len(sys.argv) > 1 else None

def comp(fn, sig, const, warps, stages, label):
    if only and only not in label:
        return
    t = time.time()
    names = list(sig)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n].startswith("*") or (sig[n] == "i32" and n != "H")}
    src = ASTSource(fn, sig, const, attrs)
    try:
        k = triton.compile(src, target=tgt, options={"num_warps": warps, "num_stages": stages})
    except Exception as e:
        print("FAIL", label, repr(e)[:400]); return
    md = k.metadata
    import re
    spills = None
    import subprocess, tempfile, os
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    r = subprocess.run([os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    res = [l.strip() for l in r.splitlines() if "REG" in l]
    print(res[0] if res else r[-300:])
    print(f"{label:70s} smem={md.shared:7d} regs={getattr(k,'n_regs',None)} spills={getattr(k,'n_spills',None)} {time.time()-t:.1f}s", flush=True)
    ptx = k.asm.get("ptx", "")
    print("    wgmma:", ptx.count("wgmma.mma_async"), "mma.sync:", ptx.count("mma.sync"), "cp.async:", ptx.count("cp.async") , "tma:", ptx.count("cp.async.bulk.tensor"))

P = "*bf16"
i32 = "i32"
def sig(names, types):
    return dict(zip(names, types))

# summary
names = ["X","Y","OUT","T","H","C","DX","DY","sxb","sxt","sxh","syb","syt","syh","BX","BY","BT","IEEE"]
for c in m._summary_tuned.configs:
    for DX, DY in [(256, 512)]:
        kw = c.kwargs
        s = {"X":P,"Y":P,"OUT":P,"T":i32,"H":i32,"C":"constexpr","DX":"constexpr","DY":"constexpr",**{n:i32 for n in names[8:14]},"BX":"constexpr","BY":"constexpr","BT":"constexpr","IEEE":"constexpr"}
        const = {"C":256,"DX":DX,"DY":DY,"IEEE":False, **kw}
        comp(m._summary_kernel, s, const, c.num_warps, c.num_stages, f"summary {kw} w{c.num_warps} s{c.num_stages}")

# scores
for c in m._scores_tuned.configs:
    for E in (256, 512):
        kw = c.kwargs
        s = {"X":P,"Y":P,"P":P,"RS":"*fp32","Z":"*fp32","lg2_ptr":"*fp32","T":i32,"H":i32,"C":"constexpr","E":"constexpr",
             **{n:i32 for n in ["sxb","sxt","sxh","syb","syt","syh"]},"BT":"constexpr","BE":"constexpr","ROW_SUMS":"constexpr","IEEE":"constexpr"}
        const = {"C":256,"E":E,"ROW_SUMS":E==256,"IEEE":False, **kw}
        comp(m._scores_kernel, s, const, c.num_warps, c.num_stages, f"scores E{E} {kw} w{c.num_warps} s{c.num_stages}")

# out
for c in m._out_tuned.configs:
    for (E, D, tm, tp, q, name) in [(256,512,False,False,True,"o"),(512,256,True,False,True,"dq"),(512,256,True,True,False,"dk"),(256,512,False,True,False,"dv")]:
        kw = c.kwargs
        s = {"X":P,"M":P,"P":P,"Y":P,"OUT":P,"lg2_ptr":"*fp32","T":i32,"H":i32,"C":"constexpr","E":"constexpr","D":"constexpr",
             **{n:i32 for n in ["sxb","sxt","sxh","syb","syt","syh","sob","sot","soh","m_bh","m_n"]},
             "TRANS_M":"constexpr","TRANS_P":"constexpr","QUERY":"constexpr","BT":"constexpr","BD":"constexpr","BE":"constexpr","BS":"constexpr","IEEE":"constexpr"}
        const = {"C":256,"E":E,"D":D,"TRANS_M":tm,"TRANS_P":tp,"QUERY":q,"IEEE":False, **kw}
        comp(m._out_kernel, s, const, c.num_warps, c.num_stages, f"out-{name} {kw} w{c.num_warps} s{c.num_stages}")
