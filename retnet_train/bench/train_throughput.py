"""Training throughput of RetNet, the Transformer baseline and (if installed) fla's RetNet,
measured in one process on one GPU with the real DeepSpeed training step.

    python -m retnet_train.bench.train_throughput --preset 1.3b --seq-len 2048,8192,32768 --micro-batch 2 \
        --grad-accum 4 --plot sweep.png

Prints one JSON line per model and sequence length: tokens/s, peak GiB, MFU (6N and model FLOPs),
final loss; --plot draws tokens/s and peak memory against sequence length, one line per model.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import yaml
from omegaconf import OmegaConf

from ..components.config import TrainConfig
from ..components.distributed import init_distributed
from ..components.metrics import device_peak_flops, peak_memory_gib
from ..components.optim import deepspeed_config, skip_duplicate_overflow_check
from ..model import build_model, model_config_from_dict
from ..model.config import RETENTION_BACKENDS
from ..model.flops import flops_per_token
from ..parallel import parallelize
from .gpu_profile import time_breakdown, top_kernels
from .sweep import batch_for_length, plot_sweep, results_device

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "model")


def load_preset(name: str, **overrides):
    path = os.path.join(CONFIG_DIR, f"{name}.yaml")
    if not os.path.exists(path):
        raise SystemExit(f"--preset: no model preset {path}")
    with open(path) as f:
        return model_config_from_dict({**yaml.safe_load(f), **overrides})


def fla_reference(cfg):
    """fla's HF RetNetForCausalLM at our preset's size (swiglu FFN of ~the same parameters)."""
    from fla.models import RetNetConfig as FlaConfig
    from fla.models import RetNetForCausalLM as FlaRetNet

    return FlaRetNet(
        FlaConfig(
            hidden_size=cfg.d_model,
            num_hidden_layers=cfg.n_layers,
            num_heads=cfg.n_heads,
            expand_v=cfg.value_factor,
            hidden_ratio=2,
            vocab_size=cfg.vocab_size,
            fuse_cross_entropy=True,
        )
    )


def engine_config(micro_batch: int, zero_stage: int, grad_accum: int = 1, bf16: bool = True, overrides=None) -> dict:
    """The trainer's DeepSpeed config at its defaults (DeepSpeedConfig in components/config.py: buckets,
    contiguous gradients, whole-block gathering under ZeRO-3; one rank), clipping at 1.0,
    deep-merged with `overrides` (--ds-json)."""
    cfg = TrainConfig()
    cfg.train.micro_batch_size, cfg.deepspeed.zero_stage = micro_batch, zero_stage
    cfg.deepspeed.precision = "bf16" if bf16 else "fp32"
    config = deepspeed_config(cfg, grad_accum, world_size=1)  # the bench runs on one GPU
    config["gradient_clipping"] = 1.0  # the trainer's fp32 ZeRO-0 clips in its own optimizer instead
    return OmegaConf.to_container(OmegaConf.merge(config, overrides or {}))


def make_engine(model, micro_batch: int, zero_stage: int, grad_accum: int = 1, bf16: bool = True, ds_overrides=None):
    """The benchmarks' DeepSpeed engine: AdamW (fused on GPU) under engine_config."""
    import deepspeed

    fused = next(model.parameters()).is_cuda or None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), weight_decay=0.05, fused=fused)
    config = engine_config(micro_batch, zero_stage, grad_accum, bf16, ds_overrides)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    skip_duplicate_overflow_check(engine)  # as the trainer does
    return engine


def train_step(engine, batch, ours: bool, accum: int = 1, marks=None, timer=None):
    """One optimizer step over `accum` micro-batches; `timer` appends 4 marks to `marks` around the
    phases of the last micro-batch: forward | backward | optimizer step (DeepSpeed's, incl. its
    gradient copies and clipping), on a GPU timed without a host sync."""
    for i in range(accum):
        mark = marks is not None and i == accum - 1
        if mark:
            marks.append(timer.mark())
        if ours:
            loss = engine(
                batch["input_ids"], labels=batch["labels"], doc_starts=batch.get("doc_starts"), return_logits=False
            ).loss
        else:  # HF convention: labels are shifted inside
            loss = engine(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        if mark:
            marks.append(timer.mark())
        engine.backward(loss)
        if mark:
            marks.append(timer.mark())
        engine.step()  # a no-op until the accumulation boundary
    if marks is not None:
        marks.append(timer.mark())
    return loss


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
    """Bytes allocated now ("now") or at the peak since the last reset ("peak") on a GPU. On CPU
    there is no allocator count: 0 now, and the process's peak resident memory (it only grows)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated() if what == "now" else torch.cuda.max_memory_allocated()
    return 0 if what == "now" else int(peak_memory_gib(device) * 2**30)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


@dataclass
class Timing:
    """The timed steps: the last loss, their wall time and the mean ms per phase (forward, backward, step)."""

    loss: torch.Tensor
    seconds: float
    phase_ms: list


@dataclass
class MemoryUse:
    """Bytes allocated before the model was built, between steps (resident) and at the peak of the timed steps."""

    before: int
    resident: int
    peak: int


def build_on_device(build, device: torch.device):
    """(model, parameter count): built from seed 0 in bf16 on a GPU, fp32 on CPU; counted before ZeRO-3
    partitions the parameters to empty shells."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build().to(device=device, dtype=dtype)
    return model, sum(p.numel() for p in model.parameters())


def prepare_model(model, ours: bool, args) -> None:
    """Our models: compile and activation checkpointing as the trainer applies them; fla's: HF's own checkpointing."""
    if ours:
        parallelize(
            model,
            compile=args.compile,
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


def start_profile(enabled: bool, device: torch.device):
    """A running CUDA-kernel profile, or None (not asked for, or on CPU)."""
    if not (enabled and device.type == "cuda"):
        return None
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
    prof.__enter__()
    return prof


def timed_steps(engine, batch, ours: bool, steps: int, accum: int, timer: Timer) -> Timing:
    marks = []
    start = time.perf_counter()
    for _ in range(steps):
        marks.append([])
        loss = train_step(engine, batch, ours, accum, marks[-1], timer)
    timer.sync()
    elapsed = time.perf_counter() - start
    phases = [sum(timer.ms(m[i], m[i + 1]) for m in marks) / steps for i in range(3)]
    return Timing(loss, elapsed, phases)


def memory_fields(mem: MemoryUse, on_gpu: bool) -> dict:
    return {
        # this model's own: what an earlier model in the process left allocated is not counted
        # (on CUDA, ~the bf16 weights stay behind after release(); not reproducible on CPU).
        # CPU: the process's peak resident memory, which includes every earlier model's
        "peak_gib": round((mem.peak - mem.before) / 2**30, 2),
        # the peak above what stays allocated between steps: activations and temporaries
        "activation_gib": round((mem.peak - mem.resident) / 2**30, 2) if on_gpu else None,
        "resident_gib": round((mem.resident - mem.before) / 2**30, 2) if on_gpu else None,
    }


def mfu_fields(tokens_per_s: float, cfg, seq_len: int, device: torch.device) -> dict:
    flops = flops_per_token(cfg, seq_len)
    peak = device_peak_flops(device, None)
    return {
        "mfu_6n": round(tokens_per_s * flops["six_n"] / peak, 4) if peak else None,
        "mfu_model": round(tokens_per_s * flops["model"] / peak, 4) if peak else None,
    }


def result_row(name: str, args, cfg, n_params: int, timing: Timing, mem: MemoryUse, device: torch.device) -> dict:
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
        "compile": args.compile,
        "activation_memory_budget": args.activation_memory_budget,
        "ds_json": args.ds_json,
        "params": n_params,
        "tokens_per_s": round(tokens_per_s, 1),
        "step_s": round(timing.seconds / args.steps, 4),
        "grad_accum": args.grad_accum,
        **memory_fields(mem, on_gpu),
        "ms_forward_backward_step": [round(x, 1) for x in timing.phase_ms],
        **mfu_fields(tokens_per_s, cfg, args.seq_len, device),
        "loss": round(float(timing.loss.detach()), 4),
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "torch": torch.__version__,
        "memory_before_gib": round(mem.before / 2**30, 2),
    }


def measure(name, build, cfg, args, device):
    """One model at one sequence length and batch: warm-up, then args.steps timed optimizer steps."""
    reset_peak(device)
    mem_before = memory(device, "now")  # should be ~0: what a previous model left behind
    model, n_params = build_on_device(build, device)
    ours = name != "fla"
    prepare_model(model, ours, args)
    engine = make_engine(
        model, args.micro_batch, args.zero_stage, args.grad_accum, bf16=device.type == "cuda", ds_overrides=args.ds_json
    )
    batch = random_batch(cfg.vocab_size, args.micro_batch, args.seq_len, args.doc_len, device)
    timer = Timer(device)
    warm_up(engine, batch, ours, args.warmup, args.grad_accum, timer, f"{name} T={args.seq_len}")
    prof = start_profile(args.profile, device)
    resident = memory(device, "now")  # weights, gradients, optimizer states: all but activations
    reset_peak(device)
    timing = timed_steps(engine, batch, ours, args.steps, args.grad_accum, timer)
    if prof is not None:
        prof.__exit__(None, None, None)
    mem = MemoryUse(mem_before, resident, memory(device, "peak"))
    result = result_row(name, args, cfg, n_params, timing, mem, device)
    if prof is not None:
        result["profile"] = time_breakdown(prof)
        result["top_kernels"] = top_kernels(prof)
    if ours:
        result["causal_leak"] = causal_leak(model, batch["input_ids"])
    release(engine)
    del engine, model
    gc.collect()
    reset_peak(device)
    return result


def release(engine) -> None:
    """Free the engine's GPU memory so that the next model's peak is its own."""
    engine.destroy()  # DeepSpeed's own teardown (hooks, buffers)
    engine.optimizer = engine.lr_scheduler = engine.module = None
    torch._dynamo.reset()


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


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object: {text!r}")
    return value


def int_list(text: str) -> list:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma list of integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"needs integers >= 1: {text!r}")
    return values


def model_specs(models: str, preset: str, backend: str) -> list:
    """(name, overrides, config, build) for each entry of --models."""
    specs = []
    for spec in models.split(","):
        # a model, optionally with preset overrides: retnet@normalize_retention=false@chunk_size=128
        name, *sets = spec.split("@")
        overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in sets)}
        if name not in ("retnet", "transformer", "fla"):
            raise SystemExit(f"--models: unknown model {name!r} (retnet, transformer, fla)")
        if name == "transformer":
            cfg = load_preset(f"transformer_{preset}", **overrides)
            build = lambda cfg=cfg: build_model(cfg)  # noqa: E731
        else:
            cfg = load_preset(preset, **{"retention_backend": backend, **overrides})
            build = (lambda cfg=cfg: build_model(cfg)) if name == "retnet" else (lambda cfg=cfg: fla_reference(cfg))
        specs.append((name, overrides, cfg, build))
    return specs


def fla_skip(args):
    """Why fla's model cannot run with these arguments, or None."""
    if args.activation_checkpointing == "selective":
        return "fla's model has no selective activation checkpointing"
    try:
        import fla.models  # noqa: F401
    except ImportError:
        return "flash-linear-attention is not installed"
    return None


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    """What is measured: the models, the sequence lengths, the batch and the steps."""
    p.add_argument(
        "--preset", default="1.3b", help="configs/model/<preset>.yaml; the Transformer uses transformer_<preset>"
    )
    p.add_argument(
        "--models",
        default="retnet,transformer,fla",
        help="comma list of retnet, transformer, fla; each may add preset overrides: retnet@chunk_size=128",
    )
    p.add_argument(
        "--seq-len",
        type=int_list,
        default=[8192],
        help="a comma list of sequence lengths, each measured for every model: 2048,8192,32768,65536",
    )
    p.add_argument(
        "--micro-batch",
        type=int,
        default=1,
        help="sequences per micro-batch at the first --seq-len; a "
        "later length keeps the tokens per micro-batch: max(1, micro_batch x first_len // len) sequences",
    )
    p.add_argument(
        "--grad-accum",
        default="1",
        help="micro-batches per optimizer step at the first --seq-len (a later "
        "length keeps the tokens per step: max(1, steps' tokens // (its micro-batch x len))); a comma list "
        "measures each in one process (Triton autotuning is paid once)",
    )
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)


def add_training_args(p: argparse.ArgumentParser) -> None:
    """How each model trains: ZeRO, activation checkpointing, compilation, documents, retention backend."""
    p.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3])
    p.add_argument(
        "--activation-checkpointing",
        default="none",
        choices=["none", "selective", "full"],
        help="what the backward recomputes (selective: RetNet's retention core only)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the non-kernel parts of each block")
    p.add_argument(
        "--activation-memory-budget",
        type=float,
        default=1.0,
        help="< 1 (with --compile): the compiled backward recomputes elementwise work, then GEMMs",
    )
    p.add_argument("--doc-len", type=int, default=0, help="mean document length for doc_starts (0: none)")
    p.add_argument("--backend", default="auto", choices=RETENTION_BACKENDS, help="RetNet retention backend")


def add_run_args(p: argparse.ArgumentParser) -> None:
    """Profiling, DeepSpeed overrides, the plot and the CPU check."""
    p.add_argument("--profile", action="store_true", help="add a GPU time breakdown by kernel category")
    p.add_argument(
        "--ds-json",
        type=json_object,
        default=None,
        metavar="JSON",
        help='merged into the DeepSpeed config, e.g. \'{"zero_optimization": {"overlap_comm": false}}\'',
    )
    p.add_argument(
        "--plot",
        default=None,
        metavar="PATH",
        help="write a PNG of tokens/s and peak memory against sequence length, one line per model",
    )
    p.add_argument(
        "--cpu",
        action="store_true",
        help="run on CPU (gloo, fp32; peak memory is the process's resident "
        "peak): a check of the script, not a measurement",
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sweep_args(p)
    add_training_args(p)
    add_run_args(p)
    args = p.parse_args(argv)
    if args.activation_memory_budget != 1.0 and not args.compile:
        p.error("--activation-memory-budget needs --compile")
    return args


def bench_device(cpu: bool) -> torch.device:
    """GPU 0 (or the CPU with --cpu), with a one-rank process group for DeepSpeed."""
    if not cpu and not torch.cuda.is_available():
        raise SystemExit("train_throughput needs a GPU (--cpu: check the script on CPU)")
    device = torch.device("cpu") if cpu else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_distributed(device)
    return device


def args_at_length(args, seq_len: int, base_accum: int) -> argparse.Namespace:
    """args for one point of the sweep: its length, and the batch that keeps the first length's tokens."""
    mb, steps_accum = batch_for_length(seq_len, args.seq_len[0], args.micro_batch, base_accum)
    return argparse.Namespace(**{**vars(args), "seq_len": seq_len, "micro_batch": mb, "grad_accum": steps_accum})


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
        gc.collect()
        reset_peak(device)
        return result


def emit(row: dict) -> dict:
    print(json.dumps(row), flush=True)
    return row


def run_sweep(args, device) -> list:
    """Every model at every base accumulation and length, each row printed as it is measured."""
    results = []
    for name, overrides, cfg, build in model_specs(args.models, args.preset, args.backend):
        skip = fla_skip(args) if name == "fla" else None
        if skip:
            results.append(emit({"model": name, "skipped": skip}))
            continue
        for accum in (int(a) for a in str(args.grad_accum).split(",")):
            for seq_len in args.seq_len:
                result = measure_or_oom(name, build, cfg, args_at_length(args, seq_len, accum), device)
                results.append(emit({**result, "overrides": overrides, "base_grad_accum": accum}))
    return results


def plot_title(args, results: list) -> str:
    flags = f"ZeRO-{args.zero_stage}" + (f", compiled, budget {args.activation_memory_budget}" if args.compile else "")
    first = f"{args.micro_batch} x {args.seq_len[0]} tokens per micro-batch"
    return f"{args.preset} on {results_device(results)}: {first}, {flags}"


def main(argv=None):
    args = parse_args(argv)
    device = bench_device(args.cpu)
    results = run_sweep(args, device)
    if args.plot:
        plot_sweep(results, args.plot, plot_title(args, results))
        print(f"wrote {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
