"""A sequence-length sweep of bench.train_throughput: the batch at each length and the plot."""

from __future__ import annotations


def batch_for_length(seq_len: int, first_len: int, micro_batch: int, grad_accum: int) -> tuple:
    """(micro-batch, accumulation) at seq_len for a sweep whose first length runs micro_batch x
    grad_accum sequences per step: the tokens per micro-batch and per step stay those of the first
    length, as long as a micro-batch holds at least one sequence and a step one micro-batch."""
    tokens_micro, tokens_step = micro_batch * first_len, micro_batch * grad_accum * first_len
    mb = max(1, tokens_micro // seq_len)
    return mb, max(1, tokens_step // (mb * seq_len))


def model_label(result: dict) -> str:
    overrides = "".join(f"@{k}={v}" for k, v in (result.get("overrides") or {}).items())
    return f"{result['model']}{overrides}"


def plot_sweep(results: list, path: str, title: str) -> None:
    """tokens/s and peak memory against sequence length, one line per model (and base accumulation);
    an out-of-memory length is marked with an x on the length axis."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (speed, mem) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    lines = {}
    for r in results:
        if "skipped" not in r:
            lines.setdefault((model_label(r), r.get("base_grad_accum")), []).append(r)
    for (label, accum), rows in lines.items():
        ok = sorted((r for r in rows if "oom" not in r), key=lambda r: r["seq_len"])
        name = label if len({a for _, a in lines}) == 1 else f"{label} (accum {accum})"
        (line,) = speed.plot([r["seq_len"] for r in ok], [r["tokens_per_s"] for r in ok], "o-", label=name)
        mem.plot([r["seq_len"] for r in ok], [r["peak_gib"] for r in ok], "o-", color=line.get_color(), label=name)
        for r in rows:
            if "oom" in r:
                for ax in (speed, mem):
                    ax.plot([r["seq_len"]], [0], "x", color=line.get_color(), markersize=10)
    for ax, ylabel in ((speed, "tokens / s"), (mem, "peak memory (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def results_device(results: list) -> str:
    return next((r["device"] for r in results if "device" in r), "-")
