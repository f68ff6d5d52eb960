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
        torch.cuda.reset_peak_memory_stats()


def measure(name, build, cfg, args, device):
    reset_peak(device)
    mem_before = memory(device, "now")  # should be ~0: what a previous model left behind
    torch.manual_seed(0)
    bf16 = device.type == "cuda"
    model = build().to(device=device, dtype=torch.bfloat16 if bf16 else torch.float32)
    n_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them to empty shells
    ours = name != "fla"
    if ours:
        parallelize(
            model,
            compile=args.compile,
            activation_checkpointing=args.activation_checkpointing,
            activation_memory_budget=args.activation_memory_budget,
        )
    elif args.activation_checkpointing == "full":
        model.gradient_checkpointing_enable()  # HF's: each decoder layer recomputed in the backward
    engine = make_engine(
        model, args.micro_batch, args.zero_stage, args.grad_accum, bf16=bf16, ds_overrides=args.ds_json
    )
    B, T = args.micro_batch, args.seq_len
    g = torch.Generator(device=device).manual_seed(0)
    batch = {"input_ids": torch.randint(0, cfg.vocab_size, (B, T), device=device, generator=g)}
    batch["labels"] = torch.roll(batch["input_ids"], -1, 1)
    if args.doc_len:
        batch["doc_starts"] = torch.rand(B, T, device=device, generator=g) < 1.0 / args.doc_len
    timer = Timer(device)
    t0 = time.perf_counter()
    for _ in range(args.warmup):  # includes Triton autotuning and torch.compile
        train_step(engine, batch, ours, args.grad_accum)
    timer.sync()
    print(f"[{name} T={T}] warm-up took {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    prof = None
    if args.profile and device.type == "cuda":
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
        prof.__enter__()
    resident = memory(device, "now")  # weights, gradients, optimizer states: all but activations
    reset_peak(device)
    marks = []
    start = time.perf_counter()
    for _ in range(args.steps):
        marks.append([])
        loss = train_step(engine, batch, ours, args.grad_accum, marks[-1], timer)
    timer.sync()
    elapsed = time.perf_counter() - start
    phases = [sum(timer.ms(m[i], m[i + 1]) for m in marks) / args.steps for i in range(3)]
    if prof is not None:
        prof.__exit__(None, None, None)
    tokens_per_s = args.steps * args.grad_accum * B * T / elapsed
    flops = flops_per_token(cfg, T)
    peak = device_peak_flops(device, None)
    peak_bytes = memory(device, "peak")
    on_gpu = device.type == "cuda"
    result = {
        "model": name,
        "preset": args.preset,
        "seq_len": T,
        "micro_batch": B,
        "zero_stage": args.zero_stage,
        "activation_checkpointing": args.activation_checkpointing,
        "compile": args.compile,
        "activation_memory_budget": args.activation_memory_budget,
        "ds_json": args.ds_json,
        "params": n_params,
        "tokens_per_s": round(tokens_per_s, 1),
        "step_s": round(elapsed / args.steps, 4),
        "grad_accum": args.grad_accum,
        # this model's own: what an earlier model in the process left allocated is not counted
        # (on CUDA, ~the bf16 weights stay behind after release(); not reproducible on CPU).
        # CPU: the process's peak resident memory, which includes every earlier model's
        "peak_gib": round((peak_bytes - mem_before) / 2**30, 2),
        # the peak above what stays allocated between steps: activations and temporaries
        "activation_gib": round((peak_bytes - resident) / 2**30, 2) if on_gpu else None,
        "resident_gib": round((resident - mem_before) / 2**30, 2) if on_gpu else None,
        "ms_forward_backward_step": [round(x, 1) for x in phases],
        "mfu_6n": round(tokens_per_s * flops["six_n"] / peak, 4) if peak else None,
        "mfu_model": round(tokens_per_s * flops["model"] / peak, 4) if peak else None,
        "loss": round(float(loss.detach()), 4),
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "torch": torch.__version__,
        "memory_before_gib": round(mem_before / 2**30, 2),
    }
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    args = p.parse_args(argv)
    if args.activation_memory_budget != 1.0 and not args.compile:
        p.error("--activation-memory-budget needs --compile")
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("train_throughput needs a GPU (--cpu: check the script on CPU)")
    device = torch.device("cpu") if args.cpu else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_distributed(device)
    results = []
    first_len = args.seq_len[0]
    for name, overrides, cfg, build in model_specs(args.models, args.preset, args.backend):
        skip = fla_skip(args) if name == "fla" else None
        if skip:
            results.append({"model": name, "skipped": skip})
            print(json.dumps(results[-1]), flush=True)
            continue
        for accum in (int(a) for a in str(args.grad_accum).split(",")):
            for seq_len in args.seq_len:
                mb, steps_accum = batch_for_length(seq_len, first_len, args.micro_batch, accum)
                run_args = argparse.Namespace(
                    **{**vars(args), "seq_len": seq_len, "micro_batch": mb, "grad_accum": steps_accum}
                )
                try:
                    result = measure(name, build, cfg, run_args, device)
                except torch.cuda.OutOfMemoryError as e:
                    result = {
                        "model": name,
                        "preset": args.preset,
                        "seq_len": seq_len,
                        "micro_batch": mb,
                        "grad_accum": steps_accum,
                        "oom": str(e)[:200],
                    }
                    gc.collect()
                    reset_peak(device)
                results.append({**result, "overrides": overrides, "base_grad_accum": accum})
                print(json.dumps(results[-1]), flush=True)
    if args.plot:
        flags = f"ZeRO-{args.zero_stage}" + (
            f", compiled, budget {args.activation_memory_budget}" if args.compile else ""
        )
        first = f"{args.micro_batch} x {first_len} tokens per micro-batch"
        plot_sweep(results, args.plot, f"{args.preset} on {results_device(results)}: {first}, {flags}")
        print(f"wrote {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
