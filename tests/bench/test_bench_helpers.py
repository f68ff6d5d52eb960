"""The GPU benchmarks' pure parts, on CPU: kernel categories and shares, the FLOP count, the engine config."""

from types import SimpleNamespace

import pytest

from retnet_train.bench.engine import engine_config
from retnet_train.bench.gpu_profile import host_side, idle_time, time_breakdown, top_kernels
from retnet_train.bench.retention_kernels import chunkwise_flops
from retnet_train.bench.throughput_args import json_object
from retnet_train.components.config import TrainConfig
from retnet_train.components.optim import deepspeed_config


class FakeProfile:
    def __init__(self, rows):
        self.rows = [SimpleNamespace(key=k, device_time_total=us, count=n) for k, us, n in rows]

    def key_averages(self):
        return self.rows


ROWS = [
    ("nvjet_sm90_tst_256x128_gemm", 500.0, 10),
    ("chunk_simple_gla_fwd_kernel_o", 200.0, 4),
    ("triton_per_fused_native_layer_norm_0", 100.0, 8),
    ("multi_tensor_apply_kernel<adam>", 100.0, 1),
    ("triton_poi_fused_add_mul_3", 100.0, 8),
    ("aten::mm", 9999.0, 10),  # op rows repeat their kernels' device time: not counted
    ("## Call CompiledFxGraph f2x ##", 9999.0, 4),
    ("ProfilerStep*", 9999.0, 2),
]
PROFILE = FakeProfile(ROWS)


def test_time_breakdown_categories_sum_to_one():
    shares = time_breakdown(PROFILE)
    assert shares == {"gemm": 0.5, "retention": 0.2, "norm": 0.1, "optimizer": 0.1, "elementwise_other": 0.1}


def test_cudnn_flash_attention_is_not_a_gemm():
    """cuDNN's SDPA kernels have "sm90" in their names, as the cuBLAS GEMMs do."""
    rows = [
        ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26", 300.0, 1),
        ("nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopA_NTN", 100.0, 1),
    ]
    assert time_breakdown(FakeProfile(rows)) == {"flash_attention": 0.75, "gemm": 0.25}


def test_runtime_call_rows_are_not_kernels():
    """cudaDeviceSynchronize / cudaLaunchKernel rows show device time that is their kernels' own: neither the
    breakdown nor the top list counts it."""
    rows = [("nvjet_sm90_tst_256x128_gemm", 300.0, 1), ("cudaDeviceSynchronize", 900.0, 1)]
    rows += [("cudaLaunchKernel", 500.0, 4), ("Memset (Device)", 100.0, 1)]
    assert time_breakdown(FakeProfile(rows)) == {"gemm": 0.75, "elementwise_other": 0.25}
    assert top_kernels(FakeProfile(rows)) == [[0.75, 1, "nvjet_sm90_tst_256x128_gemm"], [0.25, 1, "Memset (Device)"]]


def test_our_triton_retention_kernels_count_as_retention():
    rows = [("_apply_kernel", 300.0, 4), ("_states_pair_kernel", 100.0, 1), ("_states_kernel", 100.0, 1)]
    rows += [("triton_poi_fused_add_mul_3", 500.0, 8)]
    assert time_breakdown(FakeProfile(rows)) == {"retention": 0.5, "elementwise_other": 0.5}


def test_idle_time_counts_the_gaps_between_device_events():
    def ev(cat, name, ts, dur):
        return {"cat": cat, "name": name, "ts": ts, "dur": dur}

    # a, then b overlapping a (another stream), a gap of 300 us, a memset, a gap of 50 us, c
    trace = {
        "traceEvents": [
            ev("kernel", "a", 0, 100),
            ev("kernel", "b", 50, 100),
            ev("cpu_op", "aten::mm", 150, 1000),  # host ops are not device time
            ev("gpu_memset", "memset", 450, 50),
            ev("kernel", "c", 550, 450),
        ]
    }
    idle = idle_time(trace, steps=2)
    assert idle["gpu_busy"] == round(650 / 1000, 4)
    assert idle["idle_ms_per_step"] == 0.17  # 350 us over 2 steps
    assert idle["gaps_over_100us"] == 1
    assert idle["longest_gaps"] == [[0.3, "b", "memset"], [0.05, "memset", "c"]]
    assert host_side(trace, steps=2) == {"device_ms_per_step_launched_by": {}, "host_ms_per_call": {}}  # none recorded
    assert idle_time({"traceEvents": []}, steps=1) == {}


def test_device_time_by_the_thread_that_launched_it():
    """Kernels are linked to their launch calls by correlation id; the autograd engine's thread is "backward"."""
    from retnet_train.bench.gpu_profile import device_ms_by_launcher

    def launch(tid, corr):
        return {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "tid": tid, "ts": 0, "args": {"correlation": corr}}

    def kernel(corr, dur):
        return {"cat": "kernel", "name": "k", "ts": 0, "dur": dur, "args": {"correlation": corr}}

    trace = {
        "traceEvents": [
            {"cat": "cpu_op", "name": "autograd::engine::evaluate_function: MmBackward0", "tid": 2, "ts": 0},
            {"cat": "cpu_op", "name": "aten::mm", "tid": 1, "ts": 0},
            launch(1, 10),
            launch(2, 11),
            launch(2, 12),
            kernel(10, 3000),
            kernel(11, 1000),
            {"cat": "gpu_memset", "name": "Memset", "ts": 0, "dur": 500, "args": {"correlation": 12}},
            kernel(99, 7000),  # no launch recorded: left out
        ]
    }
    assert device_ms_by_launcher(trace, steps=2) == {"backward": 0.75, "main": 1.5}


def test_host_time_per_call_of_the_graphs_and_our_ops():
    from retnet_train.bench.gpu_profile import host_ms_per_call

    def op(name, dur):
        return {"cat": "cpu_op", "name": name, "ts": 0, "dur": dur, "tid": 1}

    trace = {"traceEvents": [op("CompiledFunction", 1000), op("CompiledFunction", 3000), op("aten::mm", 500)]}
    trace["traceEvents"] += [op("retnet_train::triton_retention", 700), {"cat": "kernel", "name": "CompiledFunction"}]
    per_call = host_ms_per_call(trace, steps=2)
    assert per_call == {"CompiledFunction": [2.0, 1.0], "retnet_train::triton_retention": [0.7, 0.5]}


def test_host_op_rows_do_not_count_their_kernels_again():
    """With the host's ops recorded, a compiled region's row carries its kernels' time as device time."""
    rows = [
        SimpleNamespace(key="Torch-Compiled Region: 0/0", device_time_total=900.0, self_device_time_total=0.0, count=4),
        SimpleNamespace(
            key="nvjet_sm90_tst_128x256_gemm", device_time_total=600.0, self_device_time_total=600.0, count=4
        ),
        SimpleNamespace(key="_apply_kernel", device_time_total=300.0, self_device_time_total=300.0, count=4),
    ]
    profile = SimpleNamespace(key_averages=lambda: rows)
    assert time_breakdown(profile) == {"gemm": 0.667, "retention": 0.333}
    assert [row[2] for row in top_kernels(profile)] == ["nvjet_sm90_tst_128x256_gemm", "_apply_kernel"]


def test_top_kernels_skips_aten_rows_and_orders_by_time():
    top = top_kernels(PROFILE, n=2)
    assert [row[2] for row in top] == ["nvjet_sm90_tst_256x128_gemm", "chunk_simple_gla_fwd_kernel_o"]
    assert top[0][:2] == [0.5, 10]


def test_chunkwise_flops_counts_the_four_products():
    B, T, H, K, V, C = 1, 8, 2, 4, 6, 4
    by_hand = 2 * B * H * (T * C * K + T * C * V + T * K * V + T * K * V)  # qk^T, sv, k^T v, q S
    assert chunkwise_flops(B, T, H, K, V, C) == pytest.approx(by_hand)


def test_bench_engine_uses_the_trainers_deepspeed_config():
    """The bench times the trainer's step: same buckets, overlap_comm, contiguous gradients."""
    cfg = TrainConfig()
    cfg.train.micro_batch_size, cfg.deepspeed.zero_stage = 2, 1
    assert engine_config(2, 1, grad_accum=4) == deepspeed_config(cfg, 4, world_size=1)
    assert engine_config(1, 1)["zero_optimization"]["contiguous_gradients"] is True


def test_bench_ds_json_merges_into_the_config():
    got = engine_config(1, 3, overrides=json_object('{"zero_optimization": {"overlap_comm": false}, "x": 1}'))
    assert got["zero_optimization"]["overlap_comm"] is False and got["x"] == 1
    assert got["zero_optimization"]["stage"] == 3 and "stage3_prefetch_bucket_size" in got["zero_optimization"]
    for bad in ("[1]", "{oops"):
        with pytest.raises(Exception, match="JSON"):
            json_object(bad)


@pytest.mark.parametrize("trace_dir", [None, "traces"])
def test_profile_fields_add_the_host_side_only_with_a_trace_dir(tmp_path, trace_dir):
    """--profile: GPU time, longest kernels and idle time; --profile-trace DIR also keeps the trace there and
    adds what the host's threads launched and spent."""
    import json

    from retnet_train.bench.throughput_measure import profile_fields

    launch = {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "tid": 1, "ts": 0, "args": {"correlation": 1}}
    kernel = {"cat": "kernel", "name": "k", "ts": 0, "dur": 2000, "args": {"correlation": 1}}

    class TracedProfile(FakeProfile):
        def export_chrome_trace(self, path):
            with open(path, "w") as f:
                json.dump({"traceEvents": [launch, kernel]}, f)

    out = None if trace_dir is None else str(tmp_path / trace_dir)
    args = SimpleNamespace(profile_trace=out, seq_len=64, micro_batch=2, grad_accum=4, steps=2, profile_top=3)
    fields = profile_fields(TracedProfile(ROWS), args, "retnet")
    assert fields["gpu_idle"]["gpu_busy"] == 1.0 and len(fields["top_kernels"]) == 3
    if trace_dir is None:
        assert "host" not in fields and "trace" not in fields and not list(tmp_path.iterdir())
    else:
        assert fields["host"]["device_ms_per_step_launched_by"] == {"main": 1.0}
        assert fields["trace"] == str(tmp_path / trace_dir / "retnet_64_mb2x4.json")
        assert (tmp_path / trace_dir / "retnet_64_mb2x4.json").exists()


def test_a_second_trace_of_the_same_model_and_length_keeps_the_first(tmp_path):
    """Two measurements named alike (retnet@chunk_size=128 and retnet@chunk_size=256 at one length, or a
    rerun into the same DIR) each keep their trace."""
    import json

    from retnet_train.bench.throughput_measure import profile_fields

    class TracedProfile(FakeProfile):
        def __init__(self, rows, tag):
            super().__init__(rows)
            self.tag = tag

        def export_chrome_trace(self, path):
            with open(path, "w") as f:
                json.dump({"traceEvents": [], "tag": self.tag}, f)

    args = SimpleNamespace(profile_trace=str(tmp_path), seq_len=64, micro_batch=1, grad_accum=1, steps=1, profile_top=3)
    first = profile_fields(TracedProfile(ROWS, "first"), args, "retnet")["trace"]
    second = profile_fields(TracedProfile(ROWS, "second"), args, "retnet")["trace"]
    assert (first, second) == (str(tmp_path / "retnet_64_mb1x1.json"), str(tmp_path / "retnet_64_mb1x1-2.json"))
    assert [json.loads(open(p).read())["tag"] for p in (first, second)] == ["first", "second"]


def test_out_of_memory_frees_the_failed_models_memory_before_the_next(monkeypatch):
    """The model and engine of a length that ran out of memory are gone when its row is returned (they
    sit in reference cycles, and the error's traceback held them while the row was built)."""
    import gc
    import weakref

    import torch

    from retnet_train.bench import throughput_measure

    class Engine:  # as DeepSpeed's: in a reference cycle (its hooks refer back to it)
        def __init__(self):
            self.me = self

    alive = []

    def measure(name, build, cfg, args, device):
        engine = Engine()
        alive.append(weakref.ref(engine))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(throughput_measure, "measure", measure)
    args = SimpleNamespace(preset="tiny", seq_len=65536, micro_batch=1, grad_accum=1)
    gc.disable()  # only the bench's own collection may free it
    try:
        row = throughput_measure.measure_or_oom("retnet", None, None, args, torch.device("cpu"))
        assert alive[0]() is None
    finally:
        gc.enable()
    assert row["oom"].startswith("CUDA out of memory") and row["seq_len"] == 65536


def test_memory_fields_split_the_peak_only_after_a_warm_up_step():
    """resident is read after the warm-up: with --warmup 0 no step has built the optimizer states yet, so
    peak - resident would count them as activations; the split is then null, the peak still reported."""
    from retnet_train.bench.throughput_measure import MemoryUse, memory_fields

    gib = 2**30
    mem = MemoryUse(before=1 * gib, resident=11 * gib, peak=31 * gib, reserved=33 * gib)
    warmed = memory_fields(mem, on_gpu=True)
    assert warmed == {"peak_gib": 30.0, "activation_gib": 20.0, "resident_gib": 10.0, "peak_reserved_gib": 32.0}
    cold = memory_fields(mem, on_gpu=True, warmed_up=False)
    assert cold == {"peak_gib": 30.0, "activation_gib": None, "resident_gib": None, "peak_reserved_gib": 32.0}
    assert memory_fields(mem, on_gpu=False)["activation_gib"] is None


def test_a_row_says_when_an_earlier_models_memory_was_freed_during_it():
    """Memory an earlier model left allocated and that is freed while a later model runs (a 125m sweep's
    third model read resident_gib 0.0 before measure freed each engine): the row carries a note with the amount."""
    from retnet_train.bench.throughput_measure import earlier_memory_note

    gib = 2**30
    assert earlier_memory_note(before=0, after=0) is None
    assert earlier_memory_note(before=int(1.81 * gib), after=int(1.81 * gib)) is None  # still held: subtracted
    assert earlier_memory_note(before=int(1.81 * gib), after=int(1.81 * gib) - 2**20) is None  # rounding
    note = earlier_memory_note(before=int(1.81 * gib), after=0)
    assert note.startswith("1.81 GiB") and "resident_gib and peak_gib may be low" in note


def test_a_measured_models_engine_is_gone_when_measure_returns(monkeypatch):
    """The engine sits in a reference cycle (DeepSpeed's gradient hooks), so only the garbage collector
    frees it; measure runs it after release. If anything measure returns still reached the engine (the
    last loss's autograd graph did, through the hooks), the collector would free it at some later
    allocation, in the middle of the next model's run, whose memory figures would then be off."""
    import weakref

    from retnet_train.bench import throughput_measure, train_throughput

    engines = []
    release = throughput_measure.release
    monkeypatch.setattr(throughput_measure, "release", lambda e: (engines.append(weakref.ref(e)), release(e)))
    args = train_throughput.parse_args(
        ["--cpu", "--preset", "tiny", "--seq-len", "64", "--steps", "1", "--warmup", "1", "--models", "retnet"]
    )
    name, _, cfg, build = train_throughput.model_specs(args.models, args.preset, args.backend)[0]
    at_64 = train_throughput.point_args(args, 64, 1, 1.0, "none")
    row = throughput_measure.measure(name, build, cfg, at_64, train_throughput.bench_device(True))
    assert row["tokens_per_s"] > 0 and len(engines) == 1
    assert engines[0]() is None


def test_each_point_compiles_its_own_graphs_after_an_out_of_memory_point(monkeypatch):
    """The activation memory budget is read when a block compiles, and torch.compile would serve a later
    model of the same class from the graphs already compiled: a point after one that ran out of memory
    (which skips the engine's release) must compile again under its own budget, not reuse the earlier's."""
    import torch
    from torch._dynamo.utils import counters

    from retnet_train.bench import throughput_measure, train_throughput

    timed_steps, calls = throughput_measure.timed_steps, []

    def out_of_memory_first(*a, **kw):
        calls.append(counters["stats"]["unique_graphs"])
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return timed_steps(*a, **kw)

    monkeypatch.setattr(throughput_measure, "timed_steps", out_of_memory_first)
    args = train_throughput.parse_args(
        ["--cpu", "--preset", "tiny", "--seq-len", "64", "--steps", "1", "--warmup", "1", "--models", "retnet"]
        + ["--compile", "--backend", "torch", "--activation-memory-budget", "0.5,1.0"]
    )
    rows = train_throughput.run_sweep(args, train_throughput.bench_device(True))
    assert "oom" in rows[0] and rows[1]["tokens_per_s"] > 0
    assert calls[1] > calls[0]  # the second point's warm-up compiled its blocks anew


class FakeAllocator:
    """torch.cuda's peak counts as the allocator keeps them: a peak since the last reset."""

    def __init__(self):
        self.now = self.peak = 0

    def use(self, n_bytes: int) -> None:
        self.now += n_bytes
        self.peak = max(self.peak, self.now)

    def reset(self) -> None:
        self.peak = self.now


def test_each_phase_of_every_micro_batch_has_its_own_peak(monkeypatch):
    """The row's peak_gib_by_phase says which phase sets the step's peak; the step's peak stays the
    most of any phase, although each phase's end restarts the allocator's count."""
    import torch

    from retnet_train.bench import engine as bench_engine
    from retnet_train.bench.throughput_measure import PhasePeaks, step_peaks

    alloc, gib = FakeAllocator(), 2**30
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: alloc.peak)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: alloc.peak + gib)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", alloc.reset)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: None)

    class Engine:  # forward keeps 3 GiB of activations, backward frees them and makes 1 GiB of gradients
        micro_batches = 0

        def __call__(self, ids, **_):
            alloc.use(3 * gib)
            return SimpleNamespace(loss=torch.zeros(()))

        def backward(self, loss):
            alloc.use(2 * gib)  # a temporary at the backward's start
            alloc.use(-5 * gib + (gib if self.micro_batches == 0 else 0))
            self.micro_batches += 1

        def step(self):
            if self.micro_batches == 2:  # the boundary: 4 GiB of fp32 copies for a moment, then the gradients go
                alloc.use(4 * gib)
                alloc.use(-5 * gib)

    alloc.use(10 * gib)  # resident
    peaks = PhasePeaks(torch.device("cuda"))
    bench_engine.train_step(Engine(), {"input_ids": None, "labels": None}, ours=True, accum=2, peaks=peaks)
    assert peaks.gib_above(gib) == {"forward": 13.0, "backward": 15.0, "step": 14.0}  # micro-batch 2: 10+1+3
    assert step_peaks(torch.device("cuda"), peaks) == (16 * gib, 17 * gib)
    assert PhasePeaks(torch.device("cpu")).gib_above(0) is None
