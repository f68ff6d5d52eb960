"""One model measured by train_throughput: built, warmed up, timed over its optimizer steps, its memory
and MFU in one result row; a row that says so where the GPU runs out of memory."""

from __future__ import annotations

import gc
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..components.metrics import device_peak_flops, peak_memory_gib
from ..model.flops import flops_per_token
from ..parallel import parallelize
from .engine import make_engine, release, train_step
from .gpu_power import PowerSampler, summarize
from .gpu_profile import host_side, idle_time, time_breakdown, top_kernels
from .presets import fla_flops_per_token


class Timer:
    """Marks on the device's timeline: CUDA events (no host sync while timing) or host clocks on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def memory(device: torch.device, what: str) -> int:
    """Bytes allocated now ("now"), at the peak since the last reset ("peak") or reserved by the allocator at
    its peak ("reserved": with CUDA graphs, whose replays allocate nothing, the peak of what runs in them
    shows only here) on a GPU. On CPU there is no allocator count: 0 now, and the process's peak resident
    memory (it only grows)."""
    if device.type == "cuda":
        counts = {
            "now": torch.cuda.memory_allocated,
            "peak": torch.cuda.max_memory_allocated,
            "reserved": torch.cuda.max_memory_reserved,
        }
        return counts[what]()
    return 0 if what == "now" else int(peak_memory_gib(device) * 2**30)


def reset_peak(device: torch.device, release_cache: bool = True) -> None:
    """A new peak count; release_cache: also hand the allocator's cached blocks back (between models,
    not before timed steps, which would then spend their first step on cudaMalloc)."""
    if device.type == "cuda":
        if release_cache:
            torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


class PhasePeaks:
    """Where a step's memory peaks: the allocator's peak (allocated and reserved) in each phase of every
    micro-batch, the forward, the backward and the optimizer step, each the most over the timed steps.
    Each phase's end reads the peak and starts a new count (host-side allocator figures: no sync)."""

    PHASES = ("forward", "backward", "step")

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.allocated = dict.fromkeys(self.PHASES, 0)
        self.reserved = dict.fromkeys(self.PHASES, 0)

    def end(self, phase: str) -> None:
        if not self.cuda:
            return
        self.allocated[phase] = max(self.allocated[phase], torch.cuda.max_memory_allocated())
        self.reserved[phase] = max(self.reserved[phase], torch.cuda.max_memory_reserved())
        torch.cuda.reset_peak_memory_stats()

    def gib_above(self, before: int) -> dict | None:
        """Each phase's peak in GiB above `before` (what an earlier model left allocated); None on CPU."""
        if not self.cuda:
            return None
        return {phase: round((self.allocated[phase] - before) / 2**30, 2) for phase in self.PHASES}


@dataclass
class Timing:
    """The timed steps: the last loss, their wall time, the mean ms per phase (forward, backward, step)
    and each phase's memory peak."""

    loss: torch.Tensor
    seconds: float
    phase_ms: list
    peaks: PhasePeaks


@dataclass
class MemoryUse:
    """Bytes allocated before the model was built, between steps (resident) and at the peak of the timed
    steps, and reserved at that peak."""

    before: int
    resident: int
    peak: int
    reserved: int


def build_on_device(build, device: torch.device):
    """(model, parameter count): built from seed 0 in bf16 on a GPU, fp32 on CPU; counted before ZeRO-3
    partitions the parameters to empty shells."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build().to(device=device, dtype=dtype)
    return model, sum(p.numel() for p in model.parameters())


def prepare_model(model, ours: bool, args) -> None:
    """Our models: compile and activation checkpointing as the trainer applies them, and no device-side
    check of the input ids (the trainer's loader checks them; random_batch draws them in range); fla's:
    HF's own checkpointing."""
    if ours:
        model.check_inputs = False
        parallelize(
            model,
            compile=args.compile,
            compile_mode=args.compile_mode,
            activation_checkpointing=args.activation_checkpointing,
            activation_memory_budget=args.activation_memory_budget,
        )
    elif args.activation_checkpointing == "full":
        model.gradient_checkpointing_enable()  # HF's: each decoder layer recomputed in the backward


def random_batch(vocab_size: int, micro_batch: int, seq_len: int, doc_len: int, device: torch.device) -> dict:
    """Tokens from seed 0, labels shifted by one, and random document starts every ~doc_len tokens (0: none)."""
    g = torch.Generator(device=device).manual_seed(0)
    batch = {"input_ids": torch.randint(0, vocab_size, (micro_batch, seq_len), device=device, generator=g)}
    batch["labels"] = torch.roll(batch["input_ids"], -1, 1)
    if doc_len:
        batch["doc_starts"] = torch.rand(micro_batch, seq_len, device=device, generator=g) < 1.0 / doc_len
    return batch


def warm_up(engine, batch, ours: bool, steps: int, accum: int, timer: Timer, label: str) -> None:
    start = time.perf_counter()
    for _ in range(steps):  # includes Triton autotuning and torch.compile
        train_step(engine, batch, ours, accum)
    timer.sync()
    print(f"[{label}] warm-up took {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


def start_profile(enabled: bool, device: torch.device, with_host: bool = False):
    """A running CUDA-kernel profile (with_host: the host's ops too, for a trace), or None (not asked
    for, or on CPU)."""
    if not (enabled and device.type == "cuda"):
        return None
    activities = [torch.profiler.ProfilerActivity.CUDA] + ([torch.profiler.ProfilerActivity.CPU] if with_host else [])
    prof = torch.profiler.profile(activities=activities)
    prof.__enter__()
    return prof


def unused_path(directory: Path, stem: str) -> Path:
    """directory/stem.json, or stem-2.json, -3, ... where it exists: another measurement's trace (a
    model with other overrides, another accumulation, an earlier run) is kept."""
    path, n = directory / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = directory / f"{stem}-{n}.json"
    return path


def profile_fields(prof, args, name: str) -> dict:
    """The profile's GPU time by category, its longest kernels and when the GPU sat idle; with
    --profile-trace DIR the Chrome trace goes to DIR/<model>_<seq_len>_mb<micro-batch>x<accum>.json
    (the row's "trace") and the host's side is added."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(args.profile_trace or tmp)
        directory.mkdir(parents=True, exist_ok=True)
        path = unused_path(directory, f"{name}_{args.seq_len}_mb{args.micro_batch}x{args.grad_accum}")
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
    fields = {"profile": time_breakdown(prof), "top_kernels": top_kernels(prof, args.profile_top)}
    fields["gpu_idle"] = idle_time(trace, args.steps)
    if args.profile_trace is not None:
        fields["host"] = host_side(trace, args.steps)
        fields["trace"] = str(path)
    return fields


def timed_steps(engine, batch, ours: bool, steps: int, accum: int, timer: Timer, device: torch.device) -> Timing:
    marks, peaks = [], PhasePeaks(device)
    start = time.perf_counter()
    for _ in range(steps):
        marks.append([])
        loss = train_step(engine, batch, ours, accum, marks[-1], timer, peaks)
    timer.sync()
    elapsed = time.perf_counter() - start
    phases = [sum(timer.ms(m[i], m[i + 1]) for m in marks) / steps for i in range(3)]
    # detached: the graph would keep the engine (its hooks) alive
    return Timing(loss.detach(), elapsed, phases, peaks)


def step_peaks(device: torch.device, peaks: PhasePeaks) -> tuple[int, int]:
    """(allocated, reserved) at the timed steps' peak: the most of any phase on a GPU (each phase's end
    restarted the allocator's count); on CPU the process's peak resident memory."""
    if peaks.cuda:
        return max(peaks.allocated.values()), max(peaks.reserved.values())
    return memory(device, "peak"), memory(device, "reserved")


def memory_fields(mem: MemoryUse, on_gpu: bool, warmed_up: bool = True) -> dict:
    """warmed_up: mem.resident was read after a step (without one, the optimizer states and gradient
    buffers do not exist yet, so the split of the peak into resident and activations is unknown)."""
    split = on_gpu and warmed_up
    return {
        # this model's own: what an earlier model in the process left allocated is not counted
        # CPU: the process's peak resident memory, which includes every earlier model's
        "peak_gib": round((mem.peak - mem.before) / 2**30, 2),
        # the peak above what stays allocated between steps: activations and temporaries
        "activation_gib": round((mem.peak - mem.resident) / 2**30, 2) if split else None,
        "resident_gib": round((mem.resident - mem.before) / 2**30, 2) if split else None,
        # the allocator's segments at the peak (cached free blocks too; CUDA graphs' memory only shows here)
        "peak_reserved_gib": round((mem.reserved - mem.before) / 2**30, 2) if on_gpu else None,
    }


def model_flops(name: str, model, cfg, n_params: int, seq_len: int, device: torch.device) -> dict:
    """FLOPs per token of the model measured: fla's from its own config (another FFN and widths than
    the preset's), ours from the preset, with the retention backend it resolves to on `device`."""
    if name == "fla":
        return fla_flops_per_token(model.config, n_params, seq_len)
    return flops_per_token(cfg, seq_len, device)


def mfu_fields(tokens_per_s: float, flops: dict, device: torch.device) -> dict:
    peak = device_peak_flops(device, None)
    return {
        "mfu_6n": round(tokens_per_s * flops["six_n"] / peak, 4) if peak else None,
        "mfu_model": round(tokens_per_s * flops["model"] / peak, 4) if peak else None,
    }


def compile_fields(args, ours: bool) -> dict:
    """torch.compile as applied: prepare_model compiles our models only (fla's runs its own kernels)."""
    compiled = args.compile and ours
    return {
        "compile": compiled,
        "compile_mode": args.compile_mode if compiled else None,
        "activation_memory_budget": args.activation_memory_budget if compiled else 1.0,
    }


def result_row(name: str, args, flops: dict, n_params: int, timing: Timing, mem: MemoryUse, device) -> dict:
    """The JSON line of one measurement."""
    on_gpu = device.type == "cuda"
    tokens_per_s = args.steps * args.grad_accum * args.micro_batch * args.seq_len / timing.seconds
    return {
        "model": name,
        "preset": args.preset,
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "zero_stage": args.zero_stage,
        "activation_checkpointing": args.activation_checkpointing,
        **compile_fields(args, ours=name != "fla"),
        "ds_json": args.ds_json,
        "params": n_params,
        "tokens_per_s": round(tokens_per_s, 1),
        "step_s": round(timing.seconds / args.steps, 4),
        "grad_accum": args.grad_accum,
        **memory_fields(mem, on_gpu, warmed_up=args.warmup > 0),
        "ms_forward_backward_step": [round(x, 1) for x in timing.phase_ms],
        # which phase sets peak_gib: the most allocated in each (above memory_before_gib)
        "peak_gib_by_phase": timing.peaks.gib_above(mem.before),
        **mfu_fields(tokens_per_s, flops, device),
        "loss": round(float(timing.loss.detach()), 4),
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "torch": torch.__version__,
        "memory_before_gib": round(mem.before / 2**30, 2),
    }


def measure(name, build, cfg, args, device):
    """One model at one sequence length and batch: warm-up, then args.steps timed optimizer steps."""
    # the budget is read when the blocks compile, and torch.compile would serve this model from an
    # earlier point's graphs (another budget) where that point ended without its release (out of memory)
    torch._dynamo.reset()
    reset_peak(device)
    mem_before = memory(device, "now")  # should be ~0: what a previous model left behind
    model, n_params = build_on_device(build, device)
    flops = model_flops(name, model, cfg, n_params, args.seq_len, device)
    ours = name != "fla"
    prepare_model(model, ours, args)
    engine = make_engine(
        model, args.micro_batch, args.zero_stage, args.grad_accum, bf16=device.type == "cuda", ds_overrides=args.ds_json
    )
    batch = random_batch(cfg.vocab_size, args.micro_batch, args.seq_len, args.doc_len, device)
    timer = Timer(device)
    warm_up(engine, batch, ours, args.warmup, args.grad_accum, timer, f"{name} T={args.seq_len}")
    prof = start_profile(args.profile, device, with_host=args.profile_trace is not None)
    resident = memory(device, "now")  # weights, gradients, optimizer states: all but activations
    reset_peak(device, release_cache=False)
    with PowerSampler(device) as power:
        timing = timed_steps(engine, batch, ours, args.steps, args.grad_accum, timer, device)
    if prof is not None:
        prof.__exit__(None, None, None)
    mem = MemoryUse(mem_before, resident, *step_peaks(device, timing.peaks))
    result = result_row(name, args, flops, n_params, timing, mem, device)
    result["gpu_power"] = summarize(power.samples, result["tokens_per_s"])
    if prof is not None:
        result.update(profile_fields(prof, args, name))
    if ours:
        result["causal_leak"] = causal_leak(model, batch["input_ids"])
    release(engine)
    del engine, model
    gc.collect()
    note = earlier_memory_note(mem.before, memory(device, "now"))
    if note:
        result["memory_note"] = note
    reset_peak(device)
    return result


def earlier_memory_note(before: int, after: int) -> str | None:
    """Why this row's memory split may be off, or None. Memory still allocated when this model started
    (`before`: measure frees each engine before the next, so normally ~0) that was freed while it ran
    makes its resident_gib and peak_gib, both counted above `before`, low by up to that much."""
    freed = before - after
    if freed < 2**26:  # 64 MiB: the allocator's own rounding between two reads
        return None
    return (
        f"{freed / 2**30:.2f} GiB that an earlier model left allocated were freed during this measurement: "
        "resident_gib and peak_gib may be low by up to that much (measure this model in its own process)"
    )


@torch.no_grad()
def causal_leak(model, ids) -> float:
    """Max |change| of the logits before position T/2 when the tokens from T/2 on change: 0 for a
    causal model (a cheap guard against a kernel reading the future)."""
    model.eval()
    half = ids.shape[1] // 2
    changed = ids.clone()
    changed[:, half:] = (changed[:, half:] + 1) % model.config.vocab_size
    a, b = model(ids).logits[:, :half].float(), model(changed).logits[:, :half].float()
    model.train()
    return float((a - b).abs().max())


def measure_or_oom(name, build, cfg, args, device) -> dict:
    """measure's row, or where the GPU runs out of memory a row that says so."""
    try:
        return measure(name, build, cfg, args, device)
    except torch.cuda.OutOfMemoryError as e:
        result = {
            "model": name,
            "preset": args.preset,
            "seq_len": args.seq_len,
            "micro_batch": args.micro_batch,
            "grad_accum": args.grad_accum,
            "oom": str(e)[:200],
        }
    # outside the except block: until it ends, the error's traceback holds measure's frame (the model,
    # the engine and its optimizer states), and the next model would start beside them
    gc.collect()
    reset_peak(device)
    return result
