"""The logged tokens/s: training time only, evaluation and checkpoint saves left out (fake clock)."""

from retnet_train.components.metrics import Throughput, mfu


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_paused_time_is_not_training_time():
    clock = FakeClock()
    meter = Throughput(tokens_seen=1000, clock=clock)
    clock.now += 2.0  # 2 s of training: 4,000 tokens
    with meter.paused():  # a 30 s checkpoint save
        clock.now += 30.0
    clock.now += 2.0  # 2 more s of training: 4,000 tokens
    assert meter.rate(9000) == 2000.0
    # the next interval starts after the log and owes nothing to the earlier pause
    clock.now += 4.0
    assert meter.rate(17000) == 2000.0


def test_an_exception_inside_a_pause_still_ends_it():
    clock = FakeClock()
    meter = Throughput(tokens_seen=0, clock=clock)
    try:
        with meter.paused():
            clock.now += 5.0
            raise RuntimeError("save failed")
    except RuntimeError:
        pass
    clock.now += 1.0
    assert meter.rate(500) == 500.0


def test_peak_flops_by_gpu_name(monkeypatch):
    """Dense bf16 peaks per device; the PCIe and NVL boards of a chip run at lower clocks and power than
    its SXM one (H100 PCIe 756 TFLOP/s against 989), so MFU is against the board's own peak."""
    import torch

    from retnet_train.components.metrics import device_peak_flops

    cuda = torch.device("cuda", 0)
    expected = {
        "NVIDIA H100 80GB HBM3": 989e12,
        "NVIDIA H100 PCIe": 756e12,
        "NVIDIA H100 NVL": 835e12,
        "NVIDIA H200": 989e12,
        "NVIDIA H200 NVL": 835e12,
        "NVIDIA A100-SXM4-80GB": 312e12,
        "NVIDIA A100 80GB PCIe": 312e12,
        "AMD Instinct MI300X": 1307e12,
        "NVIDIA L4": None,
        "NVIDIA H100 80GB HBM3 MIG 3g.40gb": None,  # a slice: its share of the peak is not the board's
    }
    for name, peak in expected.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert device_peak_flops(cuda, None) == peak, name
    assert device_peak_flops(cuda, 123e12) == 123e12  # train.peak_flops wins
    assert device_peak_flops(torch.device("cpu"), None) is None


def test_mfu_is_over_every_device():
    """tokens/s of the whole run x FLOPs per token against the peak of all `world` devices together."""
    assert mfu(1000.0, 6e9, 1e13, world=1) == 0.6
    assert mfu(1000.0, 6e9, 1e13, world=4) == 0.15
    assert mfu(1000.0, 6e9, None, world=4) is None  # the device's peak is not known
