"""The checks of the model: saved activations measured on CPU, and its predictions for the measured
1- and 2-GPU runs (docs/scaling.md, "Checked against measurements")."""

from __future__ import annotations

from dataclasses import replace

from .estimate import estimate
from .settings import DeepSpeedSettings, GiB, Hardware, load_preset


def measure_saved_activation_bytes(cfg, micro_batch: int, seq_len: int, checkpointing="none", seed: int = 0) -> int:
    """Bytes of the distinct tensors autograd saves during one training forward (chunked loss),
    counted once per storage, parameters excluded: torch.autograd.graph.saved_tensors_hooks."""
    import torch

    from ...model import build_model
    from ...parallel import parallelize

    torch.manual_seed(seed)
    model = parallelize(build_model(cfg), activation_checkpointing=checkpointing)
    model.train()
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in param_storages:
            seen.setdefault(s.data_ptr(), s.nbytes())
        return t

    ids = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, labels=ids, return_logits=False)
    out.loss.backward()  # the graph was complete
    return sum(seen.values())


def measured_bytes_per_token_per_layer(cfg, micro_batch: int, seq_len: int, checkpointing="none") -> float:
    """Per-block saved bytes per token: the difference between n_layers and 2 n_layers (the parts
    outside the blocks cancel)."""
    a = measure_saved_activation_bytes(cfg, micro_batch, seq_len, checkpointing)
    b = measure_saved_activation_bytes(replace(cfg, n_layers=2 * cfg.n_layers), micro_batch, seq_len, checkpointing)
    return (b - a) / (cfg.n_layers * micro_batch * seq_len)


# The 1- and 2-GPU runs the model is checked against (docs/scaling.md, "Checked against measurements").
# measured: peak GiB of bench/train_throughput.py (DeepSpeed's own bucket defaults, micro-batch 1,
# no accumulation; device and date in docs/scaling.md); None where no such run was measured.
# mem: the GPU's memory in GiB as torch reports it.
_RUN_FIELDS = ("run", "preset", "gpus", "zero", "ac", "mem", "measured", "note")
_H100_GIB, _H200_GIB = 79.2, 139.8
_COMPILE_NOTE = "compile saves fewer tensors (not modeled)"
_H100_NOTE = "H100, 2026-11-23"  # the device and date of the measured H100 runs
_EXPERIMENT_6_7B_NOTE = "experiment retnet_6.7b_8k (compiled, budget 0.4: keeps less, not modeled)"
MEASURED_RUNS = tuple(
    dict(zip(_RUN_FIELDS, row))
    for row in (
        ("1.3B RetNet, ZeRO-0, 1x H100, eager", "1.3b", 1, 0, False, _H100_GIB, None, ""),
        ("1.3B RetNet, ZeRO-0, 1x H100, --compile", "1.3b", 1, 0, False, _H100_GIB, 32.36, _COMPILE_NOTE),
        ("1.3B RetNet, ZeRO-1, 1x H100, --compile", "1.3b", 1, 1, False, _H100_GIB, 33.04, _H100_NOTE),
        ("1.3B Transformer, ZeRO-0, 1x H100, eager", "transformer_1.3b", 1, 0, False, _H100_GIB, 32.26, _H100_NOTE),
        ("1.3B RetNet, ZeRO-2, 2x H200", "1.3b", 2, 2, False, _H200_GIB, None, ""),
        ("6.7B RetNet, ZeRO-3, 2x H200, AC", "6.7b", 2, 3, True, _H200_GIB, None, ""),
        ("6.7B RetNet, ZeRO-3, 2x H200, no AC", "6.7b", 2, 3, False, _H200_GIB, None, _EXPERIMENT_6_7B_NOTE),
    )
)


def _predict_run(run: dict, cfg, ds: DeepSpeedSettings, hw: Hardware, **kwargs) -> dict:
    """estimate() for one measured run: seq 8192, micro-batch 1, on that run's GPU memory."""
    h = replace(hw, memory_gib=run["mem"])
    return estimate(cfg, run["gpus"], 8192, 1, run["zero"], run["ac"], ds=ds, hw=h, **kwargs)


def measured_run_predictions(hw: Hardware = Hardware()) -> list:
    """The model's numbers for MEASURED_RUNS, as the bench runs them (DeepSpeed's bucket defaults,
    grad_accum 1) and, for the multi-GPU ones, as the trainer runs them (the DeepSpeed defaults of
    components/config.py, 4M-token batches)."""
    rows = []
    for run in MEASURED_RUNS:
        cfg = load_preset(run["preset"])
        bench = _predict_run(run, cfg, DeepSpeedSettings.library_defaults(run["zero"]), hw, grad_accum=1)
        trainer = _predict_run(run, cfg, DeepSpeedSettings.trainer(), hw) if run["gpus"] > 1 else None
        rows.append({**run, "bench": bench, "trainer": trainer})
    return rows


def measured_runs_markdown(hw: Hardware = Hardware()) -> str:
    out = [
        "| run | measured peak GiB | predicted peak GiB (phase) | resident | peak - resident | comm per micro-batch "
        "| s per micro-batch | tokens/s/GPU | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in measured_run_predictions(hw):
        for label, r in (("bench", row["bench"]), ("trainer", row["trainer"])):
            if r is None:
                continue
            m, c = r["memory"], r["comm"]
            meas = f"{row['measured']:.2f}" if (row["measured"] is not None and label == "bench") else "_todo_"
            a = r["grad_accum"]
            comm = f"{c['bytes'] / a / 1e9:.1f} GB, {c['seconds'] / a * 1e3:.0f} ms" if c["bytes"] else "-"
            out.append(
                f"| {row['run']} ({label}{', accum ' + str(a) if label == 'trainer' else ''}) | {meas} | "
                f"{m['peak'] / GiB:.1f} ({m['peak_phase']}) | {m['resident'] / GiB:.1f} | "
                f"{(m['peak'] - m['resident']) / GiB:.1f} | {comm} | {r['step_seconds'] / a:.3f} | "
                f"{r['tokens_per_s_per_gpu']:,.0f} | {row['note']} |"
            )
    return "\n".join(out)
