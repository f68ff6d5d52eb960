"""The scaling model's arithmetic (bench/scaling_model/) and its check against real saved tensors."""

import json
from dataclasses import replace

import pytest

from retnet_train.bench import scaling_model as sm
from retnet_train.model import RetNetConfig, TransformerConfig
from retnet_train.model.flops import flops_per_token

SIZES = ["1.3b", "2.7b", "6.7b", "13b"]
PRESETS = ["tiny", "transformer_tiny"] + SIZES + [f"transformer_{s}" for s in SIZES]


def test_zero_bytes_per_param_by_stage():
    assert sum(sm.zero_bytes_per_param(0, 64).values()) == 16
    assert sum(sm.zero_bytes_per_param(1, 64).values()) == pytest.approx(2 + 2 + 12 / 64)
    assert sum(sm.zero_bytes_per_param(2, 64).values()) == pytest.approx(2 + 14 / 64)
    # ZeRO-3 on 64 GPUs: weights, gradients, fp32 master and moments all sharded: 16 bytes / 64
    z3 = sm.zero_bytes_per_param(3, 64)
    assert sum(z3.values()) == pytest.approx(16 / 64)
    assert z3["master"] + z3["optimizer"] + z3["grads"] == pytest.approx(14 / 64)
    with pytest.raises(ValueError):
        sm.zero_bytes_per_param(4, 8)


def test_step_transient_and_buckets():
    P = 10**9
    assert sm.step_transient_bytes(0, 8, P) == 4 * P
    assert sm.step_transient_bytes(2, 8, P) == 4 * P / 8
    # ZeRO-3: one sub-group at a time, of sub_group_size elements of this rank's partition
    assert sm.step_transient_bytes(3, 2, 5 * P, sub_group_size=P) == 4 * P
    assert sm.step_transient_bytes(3, 64, 12.8 * P, sub_group_size=P) == pytest.approx(4 * 0.2 * P)
    ds = sm.DeepSpeedSettings.trainer()
    assert (ds.reduce_bucket_size, ds.overlap_comm) == (500_000_000, True)  # DeepSpeedConfig defaults
    assert sm.bucket_bytes(0, ds) == 0
    assert sm.bucket_bytes(2, ds) == 2 * 2 * 500_000_000  # two bf16 buckets with overlap_comm
    assert sm.bucket_bytes(1, sm.DeepSpeedSettings.library_defaults(1)) == 2 * 500_000_000
    assert sm.grads_held_bytes_per_param(1, 64, grad_accum=8) == 2
    assert sm.grads_held_bytes_per_param(1, 64, grad_accum=1) == 0
    assert sm.grads_held_bytes_per_param(3, 64, grad_accum=8) == 2 / 64
    assert sm.grads_held_bytes_per_param(3, 64, grad_accum=1, backward=True) == 2 / 64


def test_zero2_gradients_and_buckets_by_phase():
    """ZeRO-2 (DeepSpeed 0.19.8 stage_1_and_2.py): a backward reduces into a new partition-sized buffer
    (added to the one kept from the earlier micro-batches after it) and its buckets, both freed after
    the step or the backward; an accumulating ZeRO-1 step keeps its buckets until the last backward."""
    assert sm.grads_held_bytes_per_param(2, 64, grad_accum=1) == 0
    assert sm.grads_held_bytes_per_param(2, 64, grad_accum=1, backward=True) == 2 / 64
    assert sm.grads_held_bytes_per_param(2, 64, grad_accum=8) == 2 / 64
    assert sm.grads_held_bytes_per_param(2, 64, grad_accum=8, backward=True) == 4 / 64
    ds = sm.DeepSpeedSettings.trainer()
    assert sm.bucket_bytes_in_forward(2, ds, grad_accum=8) == 0
    assert sm.bucket_bytes_in_forward(1, ds, grad_accum=1) == 0
    assert sm.bucket_bytes_in_forward(1, ds, grad_accum=8) == 2 * 2 * 500_000_000
    assert sm.bucket_bytes_in_forward(3, ds, grad_accum=1) == 2 * 500_000_000
    # the Transformer's loss transient (fp32 [V, d] + 3 x 256 MiB) exceeds its backward temporaries, so
    # without the buckets and with one gradient partition its forward stays below its backward
    cfg = sm.load_preset("transformer_1.3b")
    P = sm.param_counts(cfg)["total"]
    m = sm.estimate(cfg, 64, 8192, 1, 2)["memory"]  # accumulation 8
    gib = 2**30
    assert m["loss_transient"] == pytest.approx(4 * 32000 * 2048 + 3 * 2**28, rel=0.01)
    assert m["peaks"]["backward"] - m["peaks"]["forward"] == pytest.approx(
        2 * 2 * 500_000_000 + 2 * P / 64 + m["backward_working"] - m["loss_transient"]
    )
    assert m["peak_phase"] == "backward" and m["peak"] / gib == pytest.approx(m["peaks"]["backward"] / gib)
    assert m["resident"] == pytest.approx((2 + 12 / 64) * P)  # no gradient survives a ZeRO-2 step


@pytest.mark.parametrize("preset", PRESETS)
def test_param_counts_match_the_meta_device_model(preset):
    cfg = sm.load_preset(preset)
    analytic, real = sm.param_counts(cfg)["total"], sm.meta_param_count(cfg)
    assert abs(analytic / real - 1) < 0.01
    assert analytic == real  # in fact exact


def test_param_counts_follow_options():
    base = RetNetConfig(vocab_size=100, d_model=64, n_layers=2, n_heads=2, ffn_dim=96)
    for cfg in (
        base,
        replace(base, ffn_type="glu", norm="rmsnorm"),
        replace(base, tie_embeddings=True, head_norm_affine=True),
        TransformerConfig(vocab_size=100, d_model=64, n_layers=2, n_heads=2, ffn_dim=256, norm="rmsnorm"),
    ):
        assert sm.param_counts(cfg)["total"] == sm.meta_param_count(cfg)


def test_collective_bytes():
    S = 1000.0
    assert sm.collective_bus_bytes("all_reduce", S, 64) == pytest.approx(2 * 63 / 64 * S)
    assert sm.collective_bus_bytes("all_gather", S, 64) == pytest.approx(63 / 64 * S)
    assert sm.collective_bus_bytes("reduce_scatter", S, 1) == 0
    ops = {z: sm.comm_ops(z, 10, grad_accum=4) for z in range(4)}
    vol = {z: sum(sm.collective_bus_bytes(k, s, 8) * t for _, k, s, t, _ in o) for z, o in ops.items()}
    assert vol[0] == pytest.approx(2 * 7 / 8 * 20)  # one all-reduce of the bf16 gradients
    # ZeRO 1/2: DeepSpeed all-reduces the gradient buckets (use_multi_rank_bucket_allreduce), then
    # all-gathers the weights: ZeRO-1 once per step, ZeRO-2 the all-reduce every micro-batch
    assert vol[1] == pytest.approx((2 + 1) * 7 / 8 * 20)
    assert vol[2] == pytest.approx((2 * 4 + 1) * 7 / 8 * 20)
    assert vol[3] == pytest.approx(3 * 4 * 7 / 8 * 20)  # 3x the weights per micro-batch


def test_without_overlap_comm_every_collective_is_exposed():
    """overlap_comm off (DeepSpeed's own default at ZeRO 1/2, --deepspeed-defaults): the reductions and
    ZeRO-3's gathers run on the compute stream."""
    assert [op[-1] for op in sm.comm_ops(1, 10, 4, overlap_comm=False)] == ["none", "none"]
    assert [op[-1] for op in sm.comm_ops(3, 10, 4, overlap_comm=False)] == ["none"] * 3
    cfg = sm.load_preset("1.3b")
    P = sm.param_counts(cfg)["total"]
    own = sm.estimate(cfg, 64, 8192, 1, 2, ds=sm.DeepSpeedSettings.library_defaults(2))
    # 8 all-reduces of the bf16 gradients + 1 all-gather, 63/64 of 2P bytes each, at 40 GB/s
    assert own["comm"]["exposed_seconds"] == pytest.approx((2 * 8 + 1) * 63 / 64 * 2 * P / 40e9)
    trainer = sm.estimate(cfg, 64, 8192, 1, 2)  # overlap_comm: only the all-gather after the step
    assert trainer["comm"]["exposed_seconds"] == pytest.approx(63 / 64 * 2 * P / 40e9)


def test_one_gpu_has_no_overlap_bucket():
    """As components/optim.deepspeed_config: overlap_comm's second bucket only with more than one rank."""
    cfg = sm.load_preset("1.3b")
    assert sm.estimate(cfg, 1, 8192, 1, zero_stage=1)["memory"]["reduce_buckets"] == 2 * 500_000_000
    assert sm.estimate(cfg, 8, 8192, 1, zero_stage=1)["memory"]["reduce_buckets"] == 2 * 2 * 500_000_000


def test_estimate_of_zero3_on_64_gpus():
    cfg = sm.load_preset("1.3b")
    r = sm.estimate(cfg, 64, 8192, 1, zero_stage=3)
    m, P = r["memory"], r["params"]
    assert m["params"] + m["grads"] + m["master"] + m["optimizer"] == pytest.approx(16 * P / 64)
    assert r["grad_accum"] == 8 and r["tokens_per_step"] == sm.GLOBAL_BATCH_TOKENS
    assert r["comm"]["bytes"] == pytest.approx(3 * 8 * 63 / 64 * 2 * P)
    assert r["comm"]["bus_bandwidth_gbyte_s"] == pytest.approx(40)  # 400 Gb/s x 0.8 between nodes
    assert sm.estimate(cfg, 8, zero_stage=3)["comm"]["bus_bandwidth_gbyte_s"] == pytest.approx(360)  # NVLink
    # activation checkpointing keeps only the block inputs
    ac = sm.estimate(cfg, 64, 8192, 1, zero_stage=3, checkpointing="full")
    sel = sm.estimate(cfg, 64, 8192, 1, zero_stage=3, checkpointing="selective")
    # selective recomputes the q, k, v projections and the retention core: it keeps no q, k, v (2d + d_v
    # bf16 elements per token per layer) and runs their GEMMs' and the retention matmuls' forward once more
    d, vd, L, T = cfg.d_model, cfg.value_dim, cfg.n_layers, 8192
    assert r["memory"]["activations"] - sel["memory"]["activations"] == L * T * (2 * d + vd) * 2
    # ...which the backward of one block holds again, recomputed
    assert sel["memory"]["backward_working"] - r["memory"]["backward_working"] == T * (2 * d + vd) * 2
    f = flops_per_token(cfg, T)
    again = (f["model"] - f["six_n"]) / 3 + L * 2 * d * (2 * d + vd)
    assert sel["compute"]["seconds"] / r["compute"]["seconds"] == pytest.approx(1 + again / f["model"])
    assert 1.11 < sel["compute"]["seconds"] / r["compute"]["seconds"] < 1.12  # 1.3B: +11.7%
    # the recomputation runs in the backward
    assert sel["compute"]["forward_s_per_micro"] == pytest.approx(r["compute"]["forward_s_per_micro"])
    assert ac["memory"]["activations"] < r["memory"]["activations"] / 10
    assert ac["compute"]["seconds"] == pytest.approx(r["compute"]["seconds"] * 4 / 3)


def test_context_parallel_divides_activations_and_adds_state_traffic():
    cfg = sm.load_preset("1.3b")
    one = sm.estimate(cfg, 64, 8192, 1, 3)
    four = sm.estimate(cfg, 64, 8192, 1, 3, context_parallel=4)
    assert four["memory"]["activations"] == pytest.approx(one["memory"]["activations"] / 4, rel=0.05)
    # parallel/context.py: per layer, an all-gather of the 4 ranks' states [B, H, K, V + 1] fp32 and, in the
    # backward, an all-reduce of the gathered gradient: ring bytes 3/4 and 2 x 3/4 of the 4 states
    state = 4 * cfg.n_heads * 256 * 513
    cp = {op["name"]: op["bytes"] for op in four["comm"]["ops"] if op["name"].startswith("context-parallel")}
    per_step = cfg.n_layers * four["grad_accum"]
    assert cp == {
        "context-parallel all-gather": 3 * state * per_step,
        "context-parallel all-reduce": 6 * state * per_step,
    }
    # recomputing the forward (selective or full checkpointing) repeats the all-gather
    full = sm.estimate(cfg, 64, 8192, 1, 3, checkpointing="full", context_parallel=4)
    gather = [op for op in full["comm"]["ops"] if op["name"] == "context-parallel all-gather"][0]
    assert gather["bytes"] == 2 * 3 * state * per_step
    with pytest.raises(ValueError):
        sm.estimate(cfg, 64, 8192, 1, 3, context_parallel=3)


def test_predicts_the_single_gpu_measurements():
    """docs/scaling.md, H100, seq 8192, mb 1, eager: Transformer 32.26 GiB."""
    for preset, measured in (("transformer_1.3b", 32.26),):
        r = sm.estimate(
            sm.load_preset(preset), 1, 8192, 1, 0, ds=sm.DeepSpeedSettings.library_defaults(0), grad_accum=1
        )
        assert abs(r["memory"]["peak"] / sm.GiB / measured - 1) < 0.05, (preset, r["memory"]["peak"] / sm.GiB)


# --- activations: formula vs the tensors autograd really saves (CPU, torch backend, fp32) ---

SMALL = [
    RetNetConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=2, ffn_dim=256, retention_backend="torch"),  # = tiny
    # the presets' head shapes: key head 256, value head 512
    RetNetConfig(vocab_size=512, d_model=512, n_layers=1, n_heads=2, ffn_dim=1024, retention_backend="torch"),
    RetNetConfig(
        vocab_size=512,
        d_model=128,
        n_layers=2,
        n_heads=4,
        ffn_dim=192,
        ffn_type="glu",
        norm="rmsnorm",
        normalize_retention=False,
        chunk_size=32,
        retention_backend="torch",
    ),
    TransformerConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=2, ffn_dim=512),
    TransformerConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4, ffn_dim=256, ffn_type="glu", norm="rmsnorm"),
]


@pytest.mark.parametrize(
    "cfg", SMALL, ids=["tiny-shape", "preset-heads", "glu-rms-unnormalized", "transformer", "transformer-glu-rms"]
)
@pytest.mark.parametrize("checkpointing", ["none", "selective", "full"])
def test_activation_formula_matches_saved_tensors(cfg, checkpointing):
    measured = sm.measured_bytes_per_token_per_layer(cfg, 1, 512, checkpointing)
    predicted = sm.activation_bytes_per_token_per_layer(cfg, "torch", sm.FP32, checkpointing)
    # The per-layer constants (C x C decay mask, decay vectors, scan weights) are not per token:
    # the difference is < 1% at 512 tokens.
    assert abs(predicted / measured - 1) < 0.02, (predicted, measured)


@pytest.mark.parametrize("cfg", SMALL[:3], ids=["tiny-shape", "preset-heads", "glu-rms-unnormalized"])
def test_selective_drops_exactly_the_saved_q_k_v(cfg):
    """Measured: the recomputed mixing region (projections + retention core) keeps none of the rotated
    q, k (2d) and v (d_v) that "none" keeps (fp32 here), and nothing else changes."""
    none = sm.measured_bytes_per_token_per_layer(cfg, 1, 512, "none")
    selective = sm.measured_bytes_per_token_per_layer(cfg, 1, 512, "selective")
    assert none - selective == sm.FP32 * (2 * cfg.d_model + cfg.value_dim)
    assert sm.FP32 * sm.activation_elements_per_token_per_layer(cfg, "torch")["qkv"][0] == none - selective


def test_whole_model_saved_tensors_of_the_tiny_preset():
    cfg = replace(sm.load_preset("tiny"), retention_backend="torch")
    T = 512
    measured = sm.measure_saved_activation_bytes(cfg, 1, T)
    predicted = cfg.n_layers * T * sm.activation_bytes_per_token_per_layer(
        cfg, "torch", sm.FP32
    ) + sm.activation_fixed_bytes(cfg, T, T, sm.FP32)
    assert abs(predicted / measured - 1) < 0.05, (predicted, measured)


def test_both_retention_backends_keep_q_k_v_only():
    cfg = sm.load_preset("1.3b")
    fla = sm.activation_elements_per_token_per_layer(cfg, "fla")
    d = cfg.d_model
    assert sum(n for n, _ in fla.values()) == 18 * d  # 4d norms + 2d q,k + 2d v + 6d gated-norm region + 4d mlp
    assert sm.activation_bytes_per_token_per_layer(cfg, "fla") == pytest.approx(36 * d, rel=0.01)  # bf16
    assert sm.activation_elements_per_token_per_layer(cfg, "torch") == fla
    # selective keeps all but q, k, v (4d): 14d elements = 28d bytes, on either backend
    for backend in ("fla", "torch"):
        assert sm.activation_bytes_per_token_per_layer(cfg, backend, checkpointing="selective") == pytest.approx(
            28 * d, rel=0.01
        )
    # the Transformer has no selective region
    tf = sm.load_preset("transformer_1.3b")
    assert sm.activation_bytes_per_token_per_layer(tf, checkpointing="selective") == (
        sm.activation_bytes_per_token_per_layer(tf)
    )


def test_cli_json_and_tables(capsys):
    sm.main(["--preset", "1.3b", "--gpus", "64", "--zero-stage", "3", "--activation-checkpointing", "--json"])
    r = json.loads(capsys.readouterr().out)
    assert r["zero_stage"] == 3 and r["activation_checkpointing"] == "full" and r["memory"]["peak"] > 0
    sm.main(["--preset", "1.3b", "--zero-stage", "1", "--activation-checkpointing", "selective", "--json"])
    assert json.loads(capsys.readouterr().out)["activation_checkpointing"] == "selective"
    sm.main(["--preset", "2.7b", "--gpus", "128", "--zero-stage", "2"])
    assert "PEAK" in capsys.readouterr().out
    sm.main(["--measured-runs"])
    assert "32.26" in capsys.readouterr().out  # the Transformer run


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--gpus", "0"], "argument --gpus: needs an integer >= 1"),
        (["--micro-batch", "0"], "argument --micro-batch: needs an integer >= 1"),
        (["--grad-accum", "0"], "argument --grad-accum: needs an integer >= 1"),
        (["--context-parallel", "3"], "--context-parallel 3 must divide --gpus (64) and --seq-len (8192)"),
        (["--preset", "transformer_1.3b", "--context-parallel", "2"], "--context-parallel 2: modeled for RetNet only"),
        # a batch the GPUs' micro-batches do not divide: the trainer refuses it, the model must not floor it
        (
            ["--gpus", "3"],
            "--global-batch-tokens 4194304 is not a multiple of --micro-batch x --seq-len x data-parallel",
        ),
        (["--global-batch-tokens", "1000"], "give --global-batch-tokens 524288, or --grad-accum N"),
        # rates of 0 divided by zero (a traceback), negative ones gave negative times
        (["--utilization", "0"], "argument --utilization: needs a number in (0, 1]: '0'"),
        (["--efficiency", "1.5"], "argument --efficiency: needs a number in (0, 1]: '1.5'"),
        (["--ib-gbit", "0"], "argument --ib-gbit: needs a number > 0: '0'"),
        (["--nvlink-gbyte", "-450"], "argument --nvlink-gbyte: needs a number > 0: '-450'"),
        (["--gpu-memory-gib", "nan"], "argument --gpu-memory-gib: needs a number > 0: 'nan'"),
    ],
)
def test_cli_bad_arguments_are_named_errors_not_tracebacks(capsys, args, needle):
    with pytest.raises(SystemExit) as e:
        sm.main(args + ["--json"])
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_cli_accepts_a_batch_that_divides_or_an_explicit_accumulation(capsys):
    sm.main(["--preset", "1.3b", "--gpus", "3", "--grad-accum", "4", "--zero-stage", "1", "--json"])
    assert json.loads(capsys.readouterr().out)["tokens_per_step"] == 3 * 4 * 8192
    sm.main(
        ["--preset", "1.3b", "--gpus", "3", "--global-batch-tokens", str(3 * 8192 * 170), "--zero-stage", "1", "--json"]
    )
    assert json.loads(capsys.readouterr().out)["grad_accum"] == 170


def test_json_memory_in_gib_has_every_count_of_memory(capsys):
    # the ints among the counts (params, activations, buckets, loss) were left out of memory_gib
    sm.main(["--preset", "6.7b", "--gpus", "128", "--zero-stage", "2", "--json"])
    r = json.loads(capsys.readouterr().out)
    counts = {k: v for k, v in r["memory"].items() if isinstance(v, (int, float))}
    assert set(counts) < set(r["memory_gib"])
    for key, value in counts.items():
        assert r["memory_gib"][key] == pytest.approx(value / 2**30)
    assert r["memory_gib"]["peaks"] == pytest.approx({k: v / 2**30 for k, v in r["memory"]["peaks"].items()})
    assert r["memory_gib"]["activations"] == pytest.approx(36.4, abs=0.05)  # the 6.7b row of docs/scaling.md


def test_measured_runs_named_after_an_experiment_run_as_it_does():
    # A row labelled "experiment NAME" must be predicted for that experiment's ZeRO stage and activation
    # checkpointing, or --measured-runs compares a prediction with the wrong configuration.
    from omegaconf import OmegaConf

    from retnet_train.bench.scaling_model.checks import MEASURED_RUNS
    from retnet_train.components.config import checkpointing_mode
    from retnet_train.preflight.trainer_config import compose_trainer_config

    labelled = [run for run in MEASURED_RUNS if run["note"].startswith("experiment ")]
    for run in labelled:
        cfg = OmegaConf.to_container(compose_trainer_config([f"experiment={run['note'].split()[1]}"]), resolve=True)
        checkpointing = checkpointing_mode(cfg["train"]["activation_checkpointing"])
        assert (run["zero"], "full" if run["ac"] else "none") == (cfg["deepspeed"]["zero_stage"], checkpointing), run
