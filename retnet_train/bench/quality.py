r"""Quality benchmark: RetNet, Transformer and Transformer++ (and a stock Hugging Face Llama) trained
for the same tokens, on the same data in the same order, with the same schedule, on one device.

    python -m retnet_train.bench.quality --data data/debian/shards/debian --tokenizer data/debian/tokenizer.model \
        --out bench_quality [--size 125m] [--tokens 50e6] [--models retnet transformer transformer_pp llama]

Our models train through the trainer (`retnet_train.train.run`) with a config composed from Hydra
overrides exactly as `python -m retnet_train.train` composes it; `llama` is transformers'
LlamaForCausalLM of the Transformer++ preset's shape (init std 0.02, its own attention and loss) in
a plain torch loop over the same loader, schedule, optimizer groups, clipping and precision. Our
models sum the micro-batches' gradients as the trainer does by default (bf16, DeepSpeed's own);
--grad-accum-dtype fp32 sums them in fp32 as the plain loop's autocast does (docs/quality.md has what
it measured); --precision bf16-mixed gives them the plain loop's autocast, and --paired-init starts
transformer_pp from the llama loop's initial weights. A model can carry preset overrides:
`retnet:document_masking=false`.

Writes OUT/runs/<model>/ (metrics.jsonl; config.yaml too where the trainer ran it, not for llama),
OUT/quality.jsonl (a JSON line per model: validation loss at the end, tokens/s, parameters, ...), OUT/quality.md
(the same as a markdown table) and OUT/curves.png (retnet_train.plot). Each run adds or replaces its
models' rows and keeps the others', so the models can be trained in separate invocations; the
table and plot always cover every row. Each row is also printed as a JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..components.validation import perplexity
from .quality_args import MODELS, build_parser
from .quality_report import (
    PLOT_FILE,
    ROWS_FILE,
    TABLE_FILE,
    BenchError,
    load_rows,
    markdown_table,
    merge_rows,
    write_outputs,
)


@dataclass
class ModelSpec:
    name: str  # MODELS key
    overrides: dict  # model.<key> overrides, as strings for Hydra
    spec: str  # as given: the row's id

    @property
    def run_name(self) -> str:
        """The spec as a directory (and Hydra value) name: retnet:document_masking=false ->
        retnet-document_masking-false."""
        return re.sub(r"[^A-Za-z0-9_.]+", "-", self.spec)


def parse_model(spec: str) -> ModelSpec:
    name, _, rest = spec.partition(":")
    if name not in MODELS:
        raise BenchError(f"--models {spec}: {name!r} is not one of {list(MODELS)}")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise BenchError(f"--models {spec}: {item!r} is not KEY=VALUE (a model preset key)")
        overrides[key] = value
    return ModelSpec(name, overrides, spec)


@dataclass
class Settings:
    data: list[str]
    tokenizer: str | None
    size: str
    tokens: int
    seq_len: int
    batch_tokens: int
    micro_batch: int
    lr: float
    warmup_steps: int
    min_lr_ratio: float
    log_interval: int
    eval_interval: int
    eval_batches: int
    zero_stage: int
    precision: str
    grad_accum_dtype: str  # our models' deepspeed.grad_accum_dtype (fp32 | null)
    compile: bool
    device: str
    seed: int
    extra: list[str]  # further trainer overrides, for every model
    paired_init: bool = False  # transformer_pp starts from the weights the llama loop starts from

    @property
    def steps(self) -> int:
        return max(1, self.tokens // self.batch_tokens)


def trainer_overrides(s: Settings, model: ModelSpec, run_dir: Path) -> list[str]:
    """The Hydra overrides of one model's run: `python -m retnet_train.train <these>` trains it alike."""
    preset = MODELS[model.name][0].format(size=s.size)
    return [
        f"model={preset}",
        *(f"model.{k}={v}" for k, v in model.overrides.items()),
        f"data.paths=[{','.join(s.data)}]",
        f"data.tokenizer={s.tokenizer or 'null'}",
        f"data.seq_len={s.seq_len}",
        f"train.micro_batch_size={s.micro_batch}",
        f"train.global_batch_tokens={s.batch_tokens}",
        f"train.max_steps={s.steps}",
        f"train.log_interval={s.log_interval}",
        f"train.eval_interval={s.eval_interval}",
        f"train.eval_batches={s.eval_batches}",
        f"train.compile={str(s.compile).lower()}",
        f"train.device={s.device}",
        f"train.seed={s.seed}",
        "train.resume=never",
        f"optim.lr={s.lr}",
        f"optim.warmup_steps={s.warmup_steps}",
        "optim.decay=cosine",
        f"optim.min_lr_ratio={s.min_lr_ratio}",
        f"deepspeed.zero_stage={s.zero_stage}",
        f"deepspeed.precision={s.precision}",
        f"deepspeed.grad_accum_dtype={s.grad_accum_dtype}",
        f"checkpoint.interval={s.steps + 1}",
        "checkpoint.save_at_end=false",
        f"run.name={model.run_name}",
        f"run.dir={run_dir}",
        "wandb.mode=disabled",
        *s.extra,
    ]


def compose(overrides: list[str]):
    """The typed trainer config (TrainConfig) for these overrides, as the trainer's CLI composes it."""
    from ..components.config import check_values
    from ..components.typed_config import typed_config
    from ..preflight.trainer_config import PreflightError, compose_trainer_config

    try:
        cfg = typed_config(compose_trainer_config(overrides))
        check_values(cfg)
    except (PreflightError, ValueError) as e:
        raise BenchError(str(e)) from None
    return cfg


# ---------------------------------------------------------------- the two training loops


def train_ours(cfg) -> None:
    from .. import train

    train.run(cfg)


def count_params(cfg) -> int:
    import torch

    from ..model import build_model, model_config_from_dict

    with torch.device("meta"):
        return build_model(model_config_from_dict(cfg.model)).num_params()


# ---------------------------------------------------------------- rows, table, plot


def check_not_trained(run_dir: Path, model: ModelSpec, overwrite: bool) -> None:
    if run_dir.exists() and not overwrite:
        raise BenchError(f"{run_dir}: exists (an earlier run of {model.spec}); pass --overwrite to train it again")


def run_model(s: Settings, model: ModelSpec, out: Path, overwrite: bool) -> dict:
    from ..plot import read_metrics
    from .llama_loop import export_llama_init, train_llama

    run_dir = out / "runs" / model.run_name
    check_not_trained(run_dir, model, overwrite)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # the benchmark's own run directory, --overwrite given
    overrides = trainer_overrides(s, model, run_dir)
    if s.paired_init and model.name == "transformer_pp":
        init_dir = export_llama_init(compose(overrides), out / "init" / model.run_name)
        overrides.append(f"train.init_weights={init_dir}")
    cfg = compose(overrides)
    t0 = time.perf_counter()
    if model.name == "llama":
        params = train_llama(cfg)
    else:
        train_ours(cfg)
        params = count_params(cfg)
    wall = time.perf_counter() - t0
    curves = read_metrics(run_dir, model.spec)
    val = curves.final_val_loss
    tps = curves.mean_tokens_per_s()
    return {
        "model": model.spec,
        "description": MODELS[model.name][1],
        "preset": overrides[0].split("=", 1)[1],
        "loop": "plain torch" if model.name == "llama" else "retnet_train.train",
        "params": params,
        "tokens": int(curves.tokens[-1]),
        "steps": s.steps,
        "val_loss": val,
        "val_ppl": perplexity(val) if val is not None else None,
        "tokens_per_s": tps,
        "peak_mem_gib": curves.peak_mem_gib,
        "wall_s": round(wall, 1),
        "seq_len": s.seq_len,
        "batch_tokens": s.batch_tokens,
        "run_dir": str(run_dir.relative_to(out)),
        "overrides": [o for o in overrides if not o.startswith(("run.", "data.paths", "data.tokenizer"))],
    }


def release_memory() -> None:
    """Between models: drop compiled graphs and cached device memory of the previous one."""
    import torch

    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def bench(s: Settings, models: Sequence[ModelSpec], out: Path, overwrite: bool = False) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    old = load_rows(out / ROWS_FILE)
    for spec in models:  # every config composes, and no earlier run is in the way, before the first model trains
        check_not_trained(out / "runs" / spec.run_name, spec, overwrite)
        compose(trainer_overrides(s, spec, out / "runs" / spec.run_name))
    new = []
    for spec in models:
        row = run_model(s, spec, out, overwrite)
        print(json.dumps(row), flush=True)
        new.append(row)
        rows = merge_rows(old, new, MODELS)
        write_outputs(out, rows)  # after every model: a later failure keeps the finished rows
        release_memory()
    return merge_rows(old, new, MODELS)


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, argparse.Namespace]:
    a = build_parser(__doc__).parse_args(argv)
    return settings_from(a), a


def settings_from(a: argparse.Namespace) -> Settings:
    return Settings(
        data=[str(Path(d)) for d in a.data],
        tokenizer=a.tokenizer,
        size=a.size,
        tokens=int(a.tokens),
        seq_len=a.seq_len,
        batch_tokens=a.batch_tokens,
        micro_batch=a.micro_batch,
        lr=a.lr,
        warmup_steps=a.warmup_steps,
        min_lr_ratio=a.min_lr_ratio,
        log_interval=a.log_interval,
        eval_interval=a.eval_interval,
        eval_batches=a.eval_batches,
        zero_stage=a.zero_stage,
        precision=a.precision,
        grad_accum_dtype=a.grad_accum_dtype,
        compile=a.compile,
        device=a.device,
        seed=a.seed,
        extra=a.override,
        paired_init=a.paired_init,
    )


def main(argv: Sequence[str] | None = None) -> None:
    from ..components.faults import TrainingError

    s, a = parse_args(argv)
    try:
        if s.tokens < s.batch_tokens:
            raise BenchError(f"--tokens {s.tokens:,} is less than one step (--batch-tokens {s.batch_tokens:,})")
        for d in s.data:
            if not os.path.isdir(d):
                raise BenchError(f"--data {d}: no such directory (build shards with data_prep.tokenize)")
        models = [parse_model(m) for m in a.models]
        names = [m.spec for m in models]
        if len(set(names)) != len(names):
            raise BenchError(f"--models: {names} names a model twice")
        rows = bench(s, models, Path(a.out), a.overwrite)
    except (BenchError, TrainingError, ValueError) as e:  # the trainer's errors name their key or file
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(
        f"wrote {Path(a.out) / TABLE_FILE}, {Path(a.out) / ROWS_FILE} and {Path(a.out) / PLOT_FILE}:\n"
        + markdown_table(rows),
        flush=True,
    )


if __name__ == "__main__":
    main()
