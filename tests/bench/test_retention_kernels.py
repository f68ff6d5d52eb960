"""The retention-kernel benchmark's CPU-side helpers: kernel order from a profile, the table, specs."""

from types import SimpleNamespace

import pytest

from retnet_train.bench import retention_kernels as bench


def event(name, device, start, us):
    return SimpleNamespace(
        name=name, device_type=f"DeviceType.{device}", time_range=SimpleNamespace(start=start, elapsed_us=lambda: us)
    )


def test_kernel_sequence_keeps_one_step_of_device_kernels_in_launch_order():
    step = [("_states_kernel", 40.0), ("_apply_kernel", 120.0)]
    events = [event("aten::empty", "CPU", 0, 1.0)]
    for i in range(2):  # two identical steps, listed out of order
        events += [event(name, "CUDA", 1000 * i + 10 * j, us) for j, (name, us) in enumerate(step)][::-1]
    prof = SimpleNamespace(events=lambda: events)
    assert bench.kernel_sequence(prof, 2) == [["_states_kernel", 40.0], ["_apply_kernel", 120.0]]


def test_profile_reports_device_time_of_one_step(monkeypatch):
    """gpu_ms_fwd_bwd sums one step's kernels (3 profiled steps of 40 + 120 us: 0.16 ms)."""
    events = [
        event(name, "CUDA", 1000 * i + j, us)
        for i in range(3)
        for j, (name, us) in enumerate([("a", 40.0), ("b", 120.0)])
    ]
    monkeypatch.setattr(bench.torch.profiler, "profile", lambda **kw: _Recorded(events))
    monkeypatch.setattr(bench.torch.cuda, "synchronize", lambda: None)
    out = bench.profile_kernels(lambda: None, steps=3)
    assert out["gpu_ms_fwd_bwd"] == 0.16
    assert out["kernels_fwd_bwd_us"] == [["a", 40.0], ["b", 120.0]]


class _Recorded:
    """A stand-in torch.profiler.profile that holds the given events."""

    def __init__(self, events):
        self._events = events

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def events(self):
        return self._events

    def key_averages(self):
        return []


def test_table_shows_results_and_errors(capsys):
    bench.print_table(
        [
            {
                "dims": "256x512",
                "backend": "triton@128",
                "ms_fwd": 0.2,
                "ms_fwd_bwd": 0.61,
                "tflops": 300.0,
                "kept_gib": 0.0,
            },
            {"dims": "128x256", "backend": "fla", "error": "RuntimeError: fla-core is not installed"},
        ]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:2] == ["dims", "backend"]
    assert lines[1].split() == ["256x512", "triton@128", "0.200", "0.610", "300.0", "0.000"]
    assert lines[2].split()[:4] == ["128x256", "fla", "-", "-"] and "fla-core is not installed" in lines[2]


def test_dims_and_backend_checks():
    assert bench.parse_dims("256x512,128x256") == [(256, 512), (128, 256)]
    with pytest.raises(ValueError, match="unknown backend 'triton-gemm': one of fla, torch, compiled, triton$"):
        bench.retention_fn("triton-gemm", 256, None, reset=None)
    with pytest.raises(ValueError, match="unknown backend 'compile'"):
        bench.retention_fn("compile", 256, None, reset=None)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--backends", "triton@256,bogus@64"], "argument --backends: 'bogus@64': unknown backend 'bogus'"),
        (["--backends", "torch@x"], "argument --backends: 'torch@x': the chunk after @ is not an integer >= 1"),
        (["--backends", "fla@256"], "argument --backends: 'fla@256': fla runs chunk 64 whatever is asked"),
        (["--dims", "256"], "argument --dims: not a comma list of KxV head dims"),
        (["--steps", "0"], "argument --steps: needs an integer >= 1: '0'"),
    ],
)
def test_bad_arguments_are_named_before_the_gpu_is_asked_for(capsys, args, needle):
    """Each ran into a traceback (torch@x, 256) or a row per head dims after the GPU's setup (bogus), or
    timed fla's chunk 64 while counting the FLOPs of chunk 256 (fla@256)."""
    with pytest.raises(SystemExit) as e:
        bench.main(args)
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_backends_parse_to_kind_and_chunk():
    parsed = bench.parse_backends("fla,torch@256,triton")
    assert parsed == [("fla", "fla", 64), ("torch@256", "torch", 256), ("triton", "triton", 64)]


def test_stopped_is_not_a_variant_error():
    """SIGTERM's exception passes through a variant's `except Exception` to the table."""
    assert not issubclass(bench.Stopped, Exception)


def test_autotune_report_lists_picks_and_every_candidate_of_the_last_key():
    """The autotuner's cache (key -> config) and configs_timings (config -> [median ms, ...]) of its last tuning."""
    tuned = SimpleNamespace(
        cache={("K", 256): "BX: 64"},
        configs_timings={"BX: 32": [0.25, 0.2, 0.3], "BX: 64": [0.1], "BX: 128": [float("inf")] * 3},
    )
    untuned = SimpleNamespace()
    kernels = SimpleNamespace(KERNELS={"states": (None, tuned, None, None), "apply": (None, untuned, None, None)})
    assert bench.autotuned_configs(kernels) == {
        "states": {
            "picked": {"('K', 256)": "BX: 64"},
            "last_key_us": [[100.0, "BX: 64"], [250.0, "BX: 32"], [None, "BX: 128"]],
        },
        "apply": {"picked": {}, "last_key_us": []},
    }


def test_triton_pass_table_uses_the_kernels_segments_and_reports_a_mismatch(monkeypatch):
    from retnet_train.kernels import triton_retention_launch

    monkeypatch.setattr(bench.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(triton_retention_launch, "scan_segments", lambda elements, chunks, device: 2)
    names = ["_states_kernel", "_states_carry_kernel", "_scores_kernel", "_apply_kernel", "_states_pair_kernel"]
    names += ["_scores_kernel", "_apply_kernel", "_apply_kernel", "_scores_kernel", "_apply_kernel"]
    rows = bench.triton_pass_table(1, 8192, 8, 256, 512, 256, [[n, 10.0] for n in names])
    assert [r["pass"] for r in rows][:2] == ["forward: states scan", "forward: carry between segments"]
    missing_carry = [[n, 10.0] for n in names if n != "_states_carry_kernel"]
    out = bench.triton_pass_table(1, 8192, 8, 256, 512, 256, missing_carry)
    assert out["error"].startswith("ValueError: profiled retention kernels")
