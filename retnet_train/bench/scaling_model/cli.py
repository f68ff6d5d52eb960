r"""Per-GPU memory and communication of a training step under DeepSpeed ZeRO 0-3: an analytic model.

    python -m retnet_train.bench.scaling_model --preset 1.3b --gpus 64 --seq-len 8192 --micro-batch 1 \
        [--zero-stage N] [--activation-checkpointing [none|selective|full]] [--context-parallel P] [--json]
    python -m retnet_train.bench.scaling_model --markdown          # the tables of docs/scaling.md
    python -m retnet_train.bench.scaling_model --measure --preset tiny --seq-len 512   # CPU check

Everything is bytes, per GPU, for bf16 mixed precision with AdamW as DeepSpeed runs it here
(bf16 weights and gradients, fp32 master weights and moments). The arithmetic sits in small pure
functions (tested in tests/bench/test_scaling_model.py); docs/scaling.md explains each term and
where it was checked against a measurement.

Not modeled: allocator fragmentation and caching (measured peaks are `max_memory_allocated`, which
excludes them), CUDA/NCCL context (~0.5-1 GiB per process, outside torch's counters), torch.compile
(fuses elementwise ops and saves fewer tensors than eager; docs/scaling.md compares).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from ..throughput_args import count
from .checks import measured_bytes_per_token_per_layer, measured_runs_markdown
from .estimate import estimate
from .memory import CHECKPOINTING, _is_retnet, activation_bytes_per_token_per_layer
from .settings import FP32, GLOBAL_BATCH_TOKENS, DeepSpeedSettings, GiB, Hardware, load_preset


def _fmt_gib(x: float) -> str:
    return f"{x / GiB:.1f}"


def summary_lines(r: dict) -> list:
    m, c = r["memory"], r["comm"]
    ac = r["activation_checkpointing"]
    lines = [
        f"{r['model']} {r['params'] / 1e9:.2f}B params | {r['gpus']} GPUs "
        f"(dp {r['data_parallel']}, cp {r['context_parallel']}) | "
        f"ZeRO-{r['zero_stage']} | seq {r['seq_len']} mb {r['micro_batch']} accum {r['grad_accum']} | "
        f"activation checkpointing {ac} | {r['tokens_per_step']:,} tokens/step",
        "memory per GPU (GiB):",
    ]
    for k in (
        "params",
        "grads",
        "master",
        "optimizer",
        "grads_held_during_backward",
        "reduce_buckets",
        "zero3_gathered",
        "activations",
        "backward_working",
        "loss_transient",
        "step_fp32_grads",
    ):
        lines.append(f"  {k:28s} {_fmt_gib(m[k]):>8s}")
    lines.append(
        f"  {'PEAK (' + m['peak_phase'] + ')':28s} {_fmt_gib(m['peak']):>8s}   "
        + ", ".join(f"{k} {_fmt_gib(v)}" for k, v in m["peaks"].items())
    )
    lines.append(f"communication per GPU per step (bus bandwidth {c['bus_bandwidth_gbyte_s']:.0f} GB/s):")
    for op in c["ops"]:
        lines.append(
            f"  {op['name']:30s} {op['bytes'] / 1e9:9.2f} GB {op['seconds']:8.3f} s  (hides behind: {op['overlaps']})"
        )
    lines.append(
        f"  total {c['bytes'] / 1e9:.2f} GB, {c['seconds']:.3f} s; exposed after overlap {c['exposed_seconds']:.3f} s"
    )
    lines.append(
        f"compute {r['compute']['seconds']:.3f} s/step at {r['compute']['utilization']:.0%} of peak; "
        f"step {r['step_seconds']:.3f} s (no overlap {r['step_seconds_no_overlap']:.3f} s), "
        f"{r['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU; fits in {r['hardware']['memory_gib']} GiB: {r['fits']}"
    )
    return lines


SIZES = ("1.3b", "2.7b", "6.7b", "13b")
GPU_COUNTS = (64, 128, 256, 512)


def markdown_tables(seq_len: int = 8192, micro_batch: int = 1, hw: Hardware = Hardware()) -> str:
    """The tables of docs/scaling.md."""
    out = []
    for arch in ("retnet", "transformer"):
        out += memory_table(arch, seq_len, micro_batch, hw)
        out.append("")
    out += communication_table(seq_len, micro_batch, hw)
    return "\n".join(out)


def memory_table(arch: str, seq_len: int, micro_batch: int, hw: Hardware) -> list:
    """Peak memory per GPU of every size and GPU count under each ZeRO stage and checkpointing mode."""
    modes = ("none", "selective", "full") if arch == "retnet" else ("none", "full")
    out = [
        f"### Peak memory per GPU, GiB ({arch}, seq {seq_len}, micro-batch {micro_batch}, 4M-token batch)\n",
        "Cells: ZeRO-0 / 1 / 2 / 3 for each activation-checkpointing mode (`train.activation_checkpointing`). "
        "Accumulation steps = 512 / GPUs.\n",
        "| size | params | GPUs | "
        + " | ".join(f"{m}: Z0 / Z1 / Z2 / Z3" for m in modes)
        + " | activations "
        + " / ".join(modes)
        + " |",
        "|---|---|---|" + "---|" * (len(modes) + 1),
    ]
    for size in SIZES:
        cfg = load_preset(size if arch == "retnet" else f"transformer_{size}")
        for n in GPU_COUNTS:
            out.append(memory_row(cfg, size, n, modes, seq_len, micro_batch, hw))
    return out


def memory_row(cfg, size: str, gpus: int, modes: tuple, seq_len: int, micro_batch: int, hw: Hardware) -> str:
    cells, acts = [], []
    for ac in modes:
        rs = [estimate(cfg, gpus, seq_len, micro_batch, z, ac, hw=hw) for z in (0, 1, 2, 3)]
        cells.append(" / ".join(_fmt_gib(r["memory"]["peak"]) for r in rs))
        acts.append(_fmt_gib(rs[0]["memory"]["activations"]))
    return f"| {size} | {rs[0]['params'] / 1e9:.2f}B | {gpus} | " + " | ".join(cells) + f" | {' / '.join(acts)} |"


def communication_table(seq_len: int, micro_batch: int, hw: Hardware) -> list:
    """RetNet's bytes and seconds of communication per optimizer step under each ZeRO stage."""
    out = [
        f"### Communication per GPU per optimizer step (RetNet, seq {seq_len}, micro-batch {micro_batch}, 4M tokens)\n",
        f"GB sent per GPU / seconds at {hw.ib_gbit_per_gpu:.0f} Gb/s x {hw.efficiency} per GPU; compute at "
        f"{hw.utilization:.0%} of {hw.peak_flops / 1e12:.0f} TFLOP/s, no activation checkpointing "
        "(AC adds 1/3 to compute, nothing to communication).\n",
        "| size | GPUs | accum | compute s | Z0 GB, s | Z1 GB, s | Z2 GB, s | Z3 GB, s "
        "| exposed comm s Z0 / Z1 / Z2 / Z3 | Z3 comm / compute |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size in SIZES:
        cfg = load_preset(size)
        for n in GPU_COUNTS:
            rs = [estimate(cfg, n, seq_len, micro_batch, z, False, hw=hw) for z in (0, 1, 2, 3)]
            out.append(communication_row(size, n, rs))
    return out


def communication_row(size: str, gpus: int, rs: list) -> str:
    """rs: the estimates at ZeRO 0, 1, 2 and 3."""

    def gs(r):
        return f"{r['comm']['bytes'] / 1e9:.1f}, {r['comm']['seconds']:.2f}"

    return (
        f"| {size} | {gpus} | {rs[0]['grad_accum']} | {rs[0]['compute']['seconds']:.2f} | "
        + " | ".join(gs(r) for r in rs)
        + " | "
        + " / ".join(f"{r['comm']['exposed_seconds']:.2f}" for r in rs)
        + f" | {rs[3]['comm']['seconds'] / rs[3]['compute']['seconds']:.2f} |"
    )


def add_step_args(p: argparse.ArgumentParser) -> None:
    """The model, the cluster and the training step to estimate."""
    p.add_argument(
        "--preset",
        default="1.3b",
        help="configs/model/<preset>.yaml (transformer_* for the baseline) (default: %(default)s)",
    )
    p.add_argument("--gpus", type=count(1), default=64, help="GPUs in the job (default: %(default)s)")
    p.add_argument("--seq-len", type=count(1), default=8192, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--micro-batch", type=count(1), default=1, help="sequences per forward (default: %(default)s)")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=None, help="default: all four")
    p.add_argument(
        "--activation-checkpointing",
        nargs="?",
        const="full",
        default="none",
        choices=CHECKPOINTING,
        help="none | selective (RetNet's q, k, v projections and retention core) | full (every block); bare flag: full"
        " (default: %(default)s)",
    )
    p.add_argument(
        "--context-parallel",
        type=count(1),
        default=1,
        metavar="P",
        help="ranks sharing one sequence (default: %(default)s)",
    )
    p.add_argument(
        "--global-batch-tokens",
        type=count(1),
        default=GLOBAL_BATCH_TOKENS,
        help="tokens per optimizer step, train.global_batch_tokens (default: %(default)s)",
    )
    p.add_argument(
        "--grad-accum",
        type=count(1),
        default=None,
        help="default: global batch / (micro-batch * seq * data-parallel)",
    )
    p.add_argument(
        "--backend",
        choices=["fla", "torch"],
        default="fla",
        help="retention path whose saved tensors to count (default: %(default)s)",
    )
    p.add_argument(
        "--deepspeed-defaults",
        action="store_true",
        help="DeepSpeed's own bucket defaults (a config naming only the stage) instead of the trainer's "
        "(components/config.py)",
    )


def positive(maximum: float | None = None):
    """An argparse type: a finite number > 0 (and <= maximum); 0 would divide by zero, a negative time mislead."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (0 < value < float("inf")) or (maximum is not None and value > maximum):
            bound = f"in (0, {maximum:g}]" if maximum is not None else "> 0"
            raise argparse.ArgumentTypeError(f"needs a number {bound}: {text!r}")
        return value

    return parse


def add_hardware_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gpu-memory-gib",
        type=positive(),
        default=Hardware.memory_gib,
        help="memory per GPU as torch reports it; fits = peak <= 95%% of it (H200: 139.8; default: %(default)s)",
    )
    p.add_argument(
        "--ib-gbit",
        type=positive(),
        default=Hardware.ib_gbit_per_gpu,
        help="inter-node Gb/s per GPU (default: %(default)s)",
    )
    p.add_argument(
        "--nvlink-gbyte",
        type=positive(),
        default=Hardware.nvlink_gbyte_per_gpu,
        help="intra-node GB/s per GPU (default: %(default)s)",
    )
    p.add_argument(
        "--efficiency",
        type=positive(1),
        default=Hardware.efficiency,
        help="bus bandwidth / line rate (default: %(default)s)",
    )
    p.add_argument(
        "--utilization",
        type=positive(1),
        default=Hardware.utilization,
        help="executed FLOPs / peak (default: %(default)s)",
    )


def add_output_args(p: argparse.ArgumentParser) -> None:
    """What to print instead of the summary: JSON, the docs' tables, or the CPU check of the formula."""
    p.add_argument("--json", action="store_true", help="print the estimate as one JSON line per ZeRO stage")
    p.add_argument("--markdown", action="store_true", help="print the tables of docs/scaling.md")
    p.add_argument(
        "--measured-runs", action="store_true", help="predictions for the 1- and 2-GPU runs of docs/scaling.md"
    )
    p.add_argument(
        "--measure",
        action="store_true",
        help="CPU: compare the per-layer activation formula (torch backend, fp32) with saved tensors",
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m retnet_train.bench.scaling_model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_step_args(p)
    add_hardware_args(p)
    add_output_args(p)
    args = p.parse_args(argv)
    P = args.context_parallel
    if args.gpus % P or args.seq_len % P:
        p.error(f"--context-parallel {P} must divide --gpus ({args.gpus}) and --seq-len ({args.seq_len})")
    if P > 1 and not _is_retnet(load_preset(args.preset)):
        p.error(f"--context-parallel {P}: modeled for RetNet only (its state is what is passed), not {args.preset}")
    estimates = not (args.markdown or args.measured_runs or args.measure)  # the others fix their own layouts
    problem = batch_problem(args) if estimates and args.grad_accum is None else None
    if problem:
        p.error(problem)
    return args


def batch_problem(args) -> str | None:
    """What the trainer would say of this batch (train.global_batch_tokens must divide); None: it divides."""
    dp = args.gpus // args.context_parallel
    per_step = args.micro_batch * args.seq_len * dp
    if args.global_batch_tokens % per_step == 0:
        return None
    fits = -(-args.global_batch_tokens // per_step) * per_step
    return (
        f"--global-batch-tokens {args.global_batch_tokens} is not a multiple of --micro-batch x --seq-len x "
        f"data-parallel GPUs = {args.micro_batch} x {args.seq_len} x {dp} = {per_step} (the trainer refuses such "
        f"a train.global_batch_tokens): give --global-batch-tokens {fits}, or --grad-accum N"
    )


def hardware_from_args(args) -> Hardware:
    return Hardware(
        memory_gib=args.gpu_memory_gib,
        ib_gbit_per_gpu=args.ib_gbit,
        nvlink_gbyte_per_gpu=args.nvlink_gbyte,
        efficiency=args.efficiency,
        utilization=args.utilization,
    )


def activation_check(cfg, args) -> dict:
    """--measure: the per-layer activation bytes per token counted on CPU (torch backend) against the formula."""
    if _is_retnet(cfg):
        cfg = replace(cfg, retention_backend="torch")
    measured = measured_bytes_per_token_per_layer(cfg, args.micro_batch, args.seq_len, args.activation_checkpointing)
    predicted = activation_bytes_per_token_per_layer(cfg, "torch", FP32, args.activation_checkpointing)
    return {
        "preset": args.preset,
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "checkpointing": args.activation_checkpointing,
        "measured_bytes_per_token_per_layer": measured,
        "predicted": predicted,
        "relative_error": predicted / measured - 1,
    }


def estimate_stage(cfg, args, zero_stage: int, hw: Hardware) -> dict:
    """estimate() for one ZeRO stage under the trainer's DeepSpeed settings (or DeepSpeed's own defaults)."""
    if args.deepspeed_defaults:
        ds = DeepSpeedSettings.library_defaults(zero_stage)
    else:
        ds = DeepSpeedSettings.trainer()
    return estimate(
        cfg,
        args.gpus,
        args.seq_len,
        args.micro_batch,
        zero_stage,
        args.activation_checkpointing,
        args.context_parallel,
        ds,
        hw,
        args.global_batch_tokens,
        args.grad_accum,
        args.backend,
    )


def print_estimates(cfg, args, hw: Hardware) -> None:
    """One estimate per ZeRO stage asked for (default: all four), as JSON lines or summaries."""
    stages = [args.zero_stage] if args.zero_stage is not None else [0, 1, 2, 3]
    for z in stages:
        r = estimate_stage(cfg, args, z, hw)
        if args.json:
            print(json.dumps(r))
        else:
            print("\n".join(summary_lines(r)) + "\n")


def main(argv=None):
    args = parse_args(argv)
    hw = hardware_from_args(args)
    if args.markdown:
        print(markdown_tables(args.seq_len, args.micro_batch, hw))
    elif args.measured_runs:
        print(measured_runs_markdown(hw))
    elif args.measure:
        print(json.dumps(activation_check(load_preset(args.preset), args)))
    else:
        print_estimates(load_preset(args.preset), args, hw)


if __name__ == "__main__":
    main()
